"""One OpenCLIP text transformer aligned with three timm vision towers.

The three towers are of different families and see the images at different
resolutions. The loss averages their features before the contrastive loss.

    python scripts/examples/multi_vision_timm_towers.py
"""

import torch

from composer_clip.multi_encoder_model import MultiVisionCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss
from composer_clip.openclip_towers import OpenCLIPTextTransformer
from composer_clip.timm_model import TimmModel


def main():
    embed_dim = 256
    vision_towers = [
        TimmModel('vit_tiny_patch16_224', embed_dim=embed_dim, image_size=96),
        TimmModel('resnet18', embed_dim=embed_dim, image_size=128),
        TimmModel('convnext_atto', embed_dim=embed_dim, image_size=112),
    ]
    text_tower = OpenCLIPTextTransformer(context_length=32, width=256, heads=4, layers=4, output_dim=embed_dim)
    model = MultiVisionCLIP(vision_towers, text_tower, embed_dim=embed_dim)
    loss_fn = OneToManyClipLoss(text_to_multi_vision=True, num_multi_encoders=3, aggregation='mean')

    captions = ['a photo of a lighthouse', 'a photo of a fox', 'a photo of a violin', 'a photo of a tram']
    texts = text_tower.get_tokenizer()(captions)
    images = [torch.randn(len(captions), 3, *tower.image_size) for tower in vision_towers]

    outputs = model(images, texts)
    loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
    loss.backward()

    print(f'text features: {tuple(outputs["text_features"].shape)}')
    print(f'vision features: {[tuple(f.shape) for f in outputs["vision_features_list"]]}')
    print(f'loss: {loss.item():.4f}')


if __name__ == '__main__':
    main()
