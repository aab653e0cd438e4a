import math

import pytest
import torch
from torch import nn

from composer_clip.multi_encoder_model import MultiVisionCLIP


class PoolProjectVision(nn.Module):
    """Average-pool an image of any size and project its channels."""

    def __init__(self, output_dim, channels=3):
        super().__init__()
        self.output_dim = output_dim
        self.proj = nn.Linear(channels, output_dim)
        self.seen_shapes = []

    def forward(self, images):
        self.seen_shapes.append(tuple(images.shape))
        return self.proj(images.mean(dim=(2, 3)))


class BagOfTokensText(nn.Module):
    def __init__(self, output_dim, vocab_size=50):
        super().__init__()
        self.output_dim = output_dim
        self.embedding = nn.EmbeddingBag(vocab_size, output_dim)

    def forward(self, token_ids):
        return self.embedding(token_ids)


def build_model(num_towers=2, embed_dim=16, output_dict=True):
    torch.manual_seed(0)
    vision = [PoolProjectVision(embed_dim) for _ in range(num_towers)]
    return MultiVisionCLIP(vision, BagOfTokensText(embed_dim), embed_dim=embed_dim, output_dict=output_dict)


def test_multi_vision_clip_output_shapes_and_norms():
    model = build_model(num_towers=3)
    images = torch.randn(4, 3, 8, 8)
    texts = torch.randint(0, 50, (4, 6))

    outputs = model(images, texts)

    assert set(outputs) == {'text_features', 'vision_features_list', 'logit_scale'}
    assert outputs['text_features'].shape == (4, 16)
    assert len(outputs['vision_features_list']) == 3
    for features in outputs['vision_features_list']:
        assert features.shape == (4, 16)
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(outputs['text_features'].norm(dim=-1), torch.ones(4))


def test_multi_vision_clip_features_match_towers():
    model = build_model()
    images = torch.randn(4, 3, 8, 8)
    texts = torch.randint(0, 50, (4, 6))

    outputs = model(images, texts)

    for tower, features in zip(model.visual, outputs['vision_features_list']):
        raw = tower.proj(images.mean(dim=(2, 3)))
        torch.testing.assert_close(features, raw / raw.norm(dim=-1, keepdim=True))
    raw_text = model.text.embedding(texts)
    torch.testing.assert_close(outputs['text_features'], raw_text / raw_text.norm(dim=-1, keepdim=True))


def test_multi_vision_clip_routes_per_tower_images():
    model = build_model()
    small = torch.randn(2, 3, 8, 8)
    large = torch.randn(2, 3, 12, 12)

    outputs = model([small, large], torch.randint(0, 50, (2, 5)))

    assert model.visual[0].seen_shapes == [(2, 3, 8, 8)]
    assert model.visual[1].seen_shapes == [(2, 3, 12, 12)]
    expected = model.visual[1].proj(large.mean(dim=(2, 3)))
    torch.testing.assert_close(outputs['vision_features_list'][1], expected / expected.norm(dim=-1, keepdim=True))


def test_multi_vision_clip_logit_scale_init_and_cap():
    model = build_model()

    torch.testing.assert_close(model(torch.randn(2, 3, 4, 4), torch.randint(0, 50, (2, 3)))['logit_scale'],
                               torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_multi_vision_clip_tuple_output():
    model = build_model(output_dict=False)

    text_features, vision_features_list, logit_scale = model(torch.randn(2, 3, 4, 4), torch.randint(0, 50, (2, 3)))

    assert text_features.shape == (2, 16)
    assert len(vision_features_list) == 2
    assert logit_scale.ndim == 0


def test_multi_vision_clip_encode_image_unnormalized():
    model = build_model()
    images = torch.randn(3, 3, 4, 4)

    features = model.encode_image(images)

    torch.testing.assert_close(features[0], model.visual[0].proj(images.mean(dim=(2, 3))))


def test_multi_vision_clip_rejects_output_dim_mismatch():
    vision = [PoolProjectVision(16), PoolProjectVision(32)]

    with pytest.raises(ValueError, match=r'vision encoder 1 \(PoolProjectVision\) has output_dim=32 but embed_dim=16'):
        MultiVisionCLIP(vision, BagOfTokensText(16), embed_dim=16)


def test_multi_vision_clip_rejects_image_count():
    model = build_model(num_towers=2)
    images = [torch.randn(2, 3, 4, 4)] * 3

    with pytest.raises(ValueError, match='3 image inputs were passed for 2 vision encoders'):
        model(images, torch.randint(0, 50, (2, 3)))


def test_multi_vision_clip_rejects_module_without_forward():
    class NoForward(nn.Module):
        output_dim = 16

    with pytest.raises(TypeError, match=r'vision encoder 0 \(NoForward\) does not define forward'):
        MultiVisionCLIP([NoForward()], BagOfTokensText(16), embed_dim=16)
