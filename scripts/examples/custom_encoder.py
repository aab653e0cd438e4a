"""Bring your own vision encoder: implement `__init__` and `forward` and use it anywhere.

A `BaseVisionEncoder` subclass needs nothing else to work in every multi-encoder model.
Optional extras (`block_modules` for sharding and activation checkpointing, `lock`,
`preprocess_cfg`) have defaults.

    python scripts/examples/custom_encoder.py
"""

import torch
from torch import nn

from composer_clip.base_model import BaseTextEncoder, BaseVisionEncoder
from composer_clip.multi_encoder_model import MultiEncoderCLIP, MultiTextCLIP, MultiVisionCLIP
from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss


class PatchMeanEncoder(BaseVisionEncoder):
    """Embed 8x8 patches and average them."""

    def __init__(self, output_dim: int, image_size: int = 32):
        super().__init__(output_dim, image_size)
        self.patch_embed = nn.Conv2d(3, 64, kernel_size=8, stride=8)
        self.proj = nn.Linear(64, output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.patch_embed(images).mean(dim=(2, 3)))


class BagOfBytesEncoder(BaseTextEncoder):
    """Average byte embeddings of the caption."""

    def __init__(self, output_dim: int):
        super().__init__(output_dim, vocab_size=256, context_length=32)
        self.embedding = nn.EmbeddingBag(256, output_dim, padding_idx=0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(token_ids)


def tokenize_bytes(captions: list[str], context_length: int = 32) -> torch.Tensor:
    tokens = torch.zeros(len(captions), context_length, dtype=torch.long)
    for row, caption in enumerate(captions):
        data = list(caption.encode('utf-8'))[:context_length]
        tokens[row, :len(data)] = torch.tensor(data)
    return tokens


def main():
    embed_dim = 64
    captions = ['a yellow taxi', 'a snowy mountain', 'a plate of dumplings', 'an old tram']
    images = torch.randn(len(captions), 3, 32, 32)
    texts = tokenize_bytes(captions)

    model = MultiVisionCLIP([PatchMeanEncoder(embed_dim), PatchMeanEncoder(embed_dim)], BagOfBytesEncoder(embed_dim),
                            embed_dim=embed_dim)
    outputs = model(images, texts)
    loss = OneToManyClipLoss(num_multi_encoders=2)(
        outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
    loss.backward()
    print(f'MultiVisionCLIP loss: {loss.item():.4f}')

    model = MultiTextCLIP(PatchMeanEncoder(embed_dim), [BagOfBytesEncoder(embed_dim)], embed_dim=embed_dim)
    outputs = model(images, [texts])
    loss = OneToManyClipLoss(text_to_multi_vision=False, num_multi_encoders=1)(
        outputs['vision_features'], outputs['text_features_list'], outputs['logit_scale'])
    loss.backward()
    print(f'MultiTextCLIP loss: {loss.item():.4f}')

    model = MultiEncoderCLIP([PatchMeanEncoder(embed_dim)], [BagOfBytesEncoder(embed_dim)], embed_dim=embed_dim)
    outputs = model(images, texts)
    loss = MultiEncoderClipLoss(1, 1)(outputs['vision_features_list'], outputs['text_features_list'],
                                      outputs['logit_scale'])
    loss.backward()
    print(f'MultiEncoderCLIP loss: {loss.item():.4f}')


if __name__ == '__main__':
    main()
