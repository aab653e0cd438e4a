"""Three vision towers and two text towers trained together (M : N).

The towers differ in family and resolution; each gets its own image tensor. The loss
averages each side's features before the contrastive loss.

    python scripts/examples/multi_encoder_3x2.py
    python scripts/examples/multi_encoder_3x2.py --bert PATH --roberta PATH
"""

import argparse

import torch

from composer_clip.base_model import TransformersTextEncoder
from composer_clip.multi_encoder_model import MultiEncoderCLIP
from composer_clip.one_to_many_loss import MultiEncoderClipLoss
from composer_clip.timm_model import TimmModel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bert', default='bert-base-uncased', help='first text model: hub name or local folder')
    parser.add_argument('--roberta', default='roberta-base', help='second text model: hub name or local folder')
    args = parser.parse_args(argv)

    embed_dim = 128
    vision_towers = [
        TimmModel('vit_tiny_patch16_224', embed_dim=embed_dim, image_size=64),
        TimmModel('resnet18', embed_dim=embed_dim, image_size=96),
        TimmModel('convnext_atto', embed_dim=embed_dim, image_size=80),
    ]
    text_towers = [
        TransformersTextEncoder(args.bert, output_dim=embed_dim, pooler_type='mean'),
        TransformersTextEncoder(args.roberta, output_dim=embed_dim, pooler_type='mean'),
    ]
    model = MultiEncoderCLIP(vision_towers, text_towers, embed_dim=embed_dim)
    loss_fn = MultiEncoderClipLoss(num_vision_encoders=3, num_text_encoders=2, aggregation='mean')

    captions = ['a lighthouse at dusk', 'a child flying a kite']
    images = [torch.randn(len(captions), 3, tower.image_size[0], tower.image_size[1]) for tower in vision_towers]
    texts = [tower.get_tokenizer()(captions) for tower in text_towers]

    outputs = model(images, texts)
    loss = loss_fn(outputs['vision_features_list'], outputs['text_features_list'], outputs['logit_scale'])
    loss.backward()

    print(f'vision features: {[tuple(f.shape) for f in outputs["vision_features_list"]]}')
    print(f'text features: {[tuple(f.shape) for f in outputs["text_features_list"]]}')
    print(f'loss: {loss.item():.4f}')


if __name__ == '__main__':
    main()
