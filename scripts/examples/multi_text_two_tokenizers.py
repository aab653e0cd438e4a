"""One vision tower aligned with two text towers that tokenize differently.

Each text tower brings its own tokenizer, so every caption becomes one token tensor per
tower. The loss combines the two text towers with learned softmax weights.

    python scripts/examples/multi_text_two_tokenizers.py
    python scripts/examples/multi_text_two_tokenizers.py --bert PATH --roberta PATH

The default model names are HuggingFace hub names, fetched on first use; pass local
folders to run offline.
"""

import argparse

import torch

from composer_clip.base_model import TransformersTextEncoder
from composer_clip.multi_encoder_model import MultiTextCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss
from composer_clip.timm_model import TimmModel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bert', default='bert-base-uncased', help='first text model: hub name or local folder')
    parser.add_argument('--roberta', default='roberta-base', help='second text model: hub name or local folder')
    args = parser.parse_args(argv)

    embed_dim = 256
    vision = TimmModel('vit_tiny_patch16_224', embed_dim=embed_dim, image_size=64)
    bert = TransformersTextEncoder(args.bert, output_dim=embed_dim, pooler_type='cls', proj_type='linear')
    roberta = TransformersTextEncoder(args.roberta, output_dim=embed_dim, pooler_type='mean', proj_type='mlp')
    model = MultiTextCLIP(vision, [bert, roberta], embed_dim=embed_dim)
    loss_fn = OneToManyClipLoss(
        text_to_multi_vision=False, num_multi_encoders=2, aggregation='weighted', learnable_weights=True
    )

    captions = ['a red bicycle leaning on a wall', 'two cats asleep on a sofa', 'a bowl of ramen']
    images = torch.randn(len(captions), 3, 64, 64)
    texts = [bert.get_tokenizer()(captions), roberta.get_tokenizer()(captions)]

    outputs = model(images, texts)
    loss = loss_fn(outputs['vision_features'], outputs['text_features_list'], outputs['logit_scale'])
    loss.backward()

    print(f'token ids per tower: {[tuple(t.shape) for t in texts]}')
    print(f'loss: {loss.item():.4f}')
    print(f'text tower weights: {loss_fn.aggregator.weights().tolist()}')
    print(f'weight gradient: {loss_fn.aggregator.weight_logits.grad.tolist()}')


if __name__ == '__main__':
    main()
