"""Tests of OpenCLIP's native towers as base-class encoders, and of towers taken from OpenCLIP models."""

import json
import pickle

import open_clip
import pytest
import torch
from open_clip.transformer import TextTransformer, VisionTransformer

from composer_clip.base_model import BaseTextEncoder, BaseVisionEncoder
from composer_clip.openclip_towers import (
    OpenCLIPTextTransformer,
    OpenCLIPVisionTransformer,
    text_tower_from_openclip,
    vision_tower_from_openclip,
)

TEXTS = ['a photo of a cat', 'two dogs play in the snow', 'hello']

# Tiny OpenCLIP model configs in OpenCLIP's JSON format. The second one exercises QuickGELU,
# average pooling of the patch tokens, a text projection with bias and last-token text pooling.
TINY_CONFIGS = {
    'composer-clip-tiny-vit': {
        'embed_dim': 16,
        'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 32, 'head_width': 16, 'patch_size': 8},
        'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 2},
    },
    'composer-clip-tiny-vit-variant': {
        'embed_dim': 24,
        'quick_gelu': True,
        'vision_cfg': {
            'image_size': 32, 'layers': 3, 'width': 32, 'head_width': 16, 'patch_size': 8, 'pool_type': 'avg'},
        'text_cfg': {
            'context_length': 12, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 3,
            'proj_bias': True, 'pool_type': 'last'},
    },
    # custom_text builds a CustomTextCLIP, whose text tower is one module, `model.text`.
    'composer-clip-tiny-vit-custom-text': {
        'embed_dim': 16,
        'custom_text': True,
        'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 32, 'head_width': 16, 'patch_size': 8},
        'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 2},
    },
}


@pytest.fixture(scope='module')
def tiny_model_names(tmp_path_factory):
    """Register the tiny configs with `open_clip.add_model_config` from JSON files."""
    folder = tmp_path_factory.mktemp('openclip_configs')
    for name, config in TINY_CONFIGS.items():
        (folder / f'{name}.json').write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return sorted(TINY_CONFIGS)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, tiny_model_names):
    """For each tiny config: a checkpoint file with torch.save(state_dict) and the model it came from."""
    folder = tmp_path_factory.mktemp('openclip_checkpoints')
    result = {}
    for seed, name in enumerate(tiny_model_names):
        torch.manual_seed(seed)
        model = open_clip.create_model(name).eval()
        path = folder / f'{name}.pt'
        torch.save(model.state_dict(), path)
        result[name] = (str(path), model)
    return result


def _text_state_dict(state_dict):
    """The text-tower entries of an OpenCLIP state dict, keyed as in the tower.

    CustomTextCLIP keeps them under `text.`, CLIP at the root.
    """
    if any(key.startswith('text.') for key in state_dict):
        return {key.removeprefix('text.'): value for key, value in state_dict.items() if key.startswith('text.')}
    prefixes = ('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.', 'text_projection')
    return {key: value for key, value in state_dict.items() if key.startswith(prefixes)}


def _tiny_vision_transformer(**kwargs):
    torch.manual_seed(0)
    return OpenCLIPVisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16, **kwargs)


def _tiny_text_transformer(**kwargs):
    torch.manual_seed(0)
    return OpenCLIPTextTransformer(
        context_length=16, vocab_size=49408, width=32, heads=2, layers=2, mlp_ratio=2.0, **kwargs)


# Towers taken from a pretrained OpenCLIP model.


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
def test_vision_tower_matches_encode_image(checkpoints, name):
    path, model = checkpoints[name]
    torch.manual_seed(100)
    encoder = vision_tower_from_openclip(name, pretrained=path).eval()
    images = torch.randn(3, 3, 32, 32)

    with torch.no_grad():
        expected = model.encode_image(images)
        features = encoder(images)

    assert isinstance(encoder, BaseVisionEncoder)
    assert isinstance(encoder, VisionTransformer)
    assert features.shape == (3, TINY_CONFIGS[name]['embed_dim'])
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
def test_text_tower_matches_encode_text(checkpoints, name):
    path, model = checkpoints[name]
    torch.manual_seed(100)
    encoder = text_tower_from_openclip(name, pretrained=path).eval()
    token_ids = encoder.get_tokenizer()(TEXTS)

    with torch.no_grad():
        expected = model.encode_text(token_ids)
        features = encoder(token_ids)

    assert isinstance(encoder, BaseTextEncoder)
    assert isinstance(encoder, TextTransformer)
    assert features.shape == (3, TINY_CONFIGS[name]['embed_dim'])
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
def test_towers_keep_checkpoint_tensors_and_keys(checkpoints, name):
    path, _ = checkpoints[name]
    saved = torch.load(path, map_location='cpu', weights_only=True)
    saved_visual = {key.removeprefix('visual.'): value for key, value in saved.items() if key.startswith('visual.')}
    saved_text = _text_state_dict(saved)
    vision = vision_tower_from_openclip(name, pretrained=path)
    text = text_tower_from_openclip(name, pretrained=path)

    assert set(vision.state_dict()) == set(saved_visual)
    assert set(text.state_dict()) == set(saved_text)
    for key, value in vision.state_dict().items():
        assert torch.equal(value, saved_visual[key]), key
    for key, value in text.state_dict().items():
        assert torch.equal(value, saved_text[key]), key


def test_towers_without_pretrained_are_random(checkpoints):
    name = 'composer-clip-tiny-vit'
    _, model = checkpoints[name]
    torch.manual_seed(100)
    vision = vision_tower_from_openclip(name)
    text = text_tower_from_openclip(name)

    assert not torch.equal(vision.conv1.weight, model.visual.conv1.weight)
    assert not torch.equal(text.token_embedding.weight, model.token_embedding.weight)


def test_text_tower_attributes_and_tokenizer(checkpoints):
    name = 'composer-clip-tiny-vit-variant'
    path, _ = checkpoints[name]
    encoder = text_tower_from_openclip(name, pretrained=path)
    tokenizer = pickle.loads(pickle.dumps(encoder.get_tokenizer()))
    token_ids = tokenizer(TEXTS)
    expected = open_clip.get_tokenizer(name)(TEXTS)

    assert encoder.output_dim == 24
    assert encoder.context_length == 12
    assert encoder.vocab_size == 49408
    assert encoder.pad_id == 0
    assert encoder.get_num_layers() == 3
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert torch.equal(token_ids, expected)
    assert token_ids.shape == (3, 12)
    # 'hello' is start, one token, end, then padding with id 0.
    assert token_ids[2, 3:].eq(0).all()


def test_vision_tower_preprocess_cfg_from_model(checkpoints):
    name = 'composer-clip-tiny-vit'
    path, _ = checkpoints[name]
    overrides = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25), 'interpolation': 'bilinear',
                 'resize_mode': 'squash', 'fill_color': 255}
    encoder = vision_tower_from_openclip(name, pretrained=path, force_preprocess_cfg=overrides)

    assert encoder.preprocess_cfg == {'size': 32, **overrides}
    assert open_clip.transform.PreprocessCfg(**encoder.preprocess_cfg).size == 32


def test_vision_tower_default_preprocess_cfg(checkpoints):
    name = 'composer-clip-tiny-vit'
    path, _ = checkpoints[name]
    encoder = vision_tower_from_openclip(name, pretrained=path)

    assert encoder.preprocess_cfg == {
        'size': 32,
        'mean': open_clip.constants.OPENAI_DATASET_MEAN,
        'std': open_clip.constants.OPENAI_DATASET_STD,
        'interpolation': 'bicubic',
        'resize_mode': 'shortest',
        'fill_color': 0,
    }


def test_vision_tower_force_image_size(checkpoints):
    name = 'composer-clip-tiny-vit'
    path, _ = checkpoints[name]
    encoder = vision_tower_from_openclip(name, pretrained=path, force_image_size=48)

    assert encoder.image_size == (48, 48)
    assert encoder.preprocess_cfg['size'] == 48
    # OpenCLIP interpolates the 4x4 grid of position embeddings to 6x6 on load.
    assert encoder.positional_embedding.shape == (37, 32)
    assert encoder(torch.randn(2, 3, 48, 48)).shape == (2, 16)


def test_vision_tower_output_tokens(checkpoints):
    name = 'composer-clip-tiny-vit'
    path, _ = checkpoints[name]
    plain = vision_tower_from_openclip(name, pretrained=path).eval()
    encoder = vision_tower_from_openclip(name, pretrained=path, output_tokens=True).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        features, tokens = encoder(images)
        expected = plain(images)

    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    # 4x4 patches without the class token, after ln_post
    assert tokens.shape == (2, 16, 32)


def test_tower_rejects_other_output_dim(checkpoints):
    name = 'composer-clip-tiny-vit'
    path, _ = checkpoints[name]

    with pytest.raises(ValueError, match='outputs 16 features but output_dim=32.*pass output_dim=16'):
        vision_tower_from_openclip(name, pretrained=path, output_dim=32)
    with pytest.raises(ValueError, match='outputs 16 features but output_dim=32.*pass output_dim=16'):
        text_tower_from_openclip(name, pretrained=path, output_dim=32)


def test_vision_tower_rejects_timm_tower(tmp_path):
    config = {
        'embed_dim': 16,
        'vision_cfg': {'timm_model_name': 'test_vit', 'timm_model_pretrained': False, 'image_size': 32},
        'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1},
    }
    (tmp_path / 'composer-clip-tiny-timm.json').write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / 'composer-clip-tiny-timm.json')

    with pytest.raises(ValueError, match="has a TimmModel vision tower.*build composer_clip.timm_model.TimmModel"):
        vision_tower_from_openclip('composer-clip-tiny-timm')


def test_from_openclip_rejects_other_modules():
    with pytest.raises(TypeError, match='not an open_clip.transformer.VisionTransformer'):
        OpenCLIPVisionTransformer.from_openclip(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match='not an open_clip.transformer.TextTransformer'):
        OpenCLIPTextTransformer.from_openclip(torch.nn.Linear(2, 2))


# The towers built from their arguments.


def test_vision_transformer_keeps_openclip_state_dict():
    torch.manual_seed(0)
    reference = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                  output_dim=16).eval()
    encoder = _tiny_vision_transformer().eval()
    encoder.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 32, 32)

    assert list(encoder.state_dict()) == list(reference.state_dict())
    assert encoder.output_dim == 16
    assert encoder.image_size == (32, 32)
    assert encoder.preprocess_cfg['size'] == 32
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference(images), rtol=0, atol=0)


def test_text_transformer_keeps_openclip_state_dict():
    torch.manual_seed(0)
    reference = TextTransformer(context_length=16, vocab_size=49408, width=32, heads=2, layers=2, mlp_ratio=2.0,
                                output_dim=16).eval()
    encoder = _tiny_text_transformer(output_dim=16).eval()
    encoder.load_state_dict(reference.state_dict())
    token_ids = encoder.get_tokenizer()(TEXTS)

    assert list(encoder.state_dict()) == list(reference.state_dict())
    assert isinstance(encoder.get_tokenizer(), open_clip.tokenizer.SimpleTokenizer)
    assert token_ids.shape == (3, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(token_ids), reference(token_ids), rtol=0, atol=0)


def test_text_transformer_without_projection_outputs_width():
    encoder = _tiny_text_transformer(output_dim=None)
    token_ids = encoder.get_tokenizer()(TEXTS)

    assert encoder.text_projection is None
    assert encoder.output_dim == 32
    assert encoder(token_ids).shape == (3, 32)


def test_text_transformer_small_vocabulary_needs_own_tokenizer():
    encoder = OpenCLIPTextTransformer(context_length=8, vocab_size=100, width=16, heads=2, layers=1, output_dim=8)

    with pytest.raises(ValueError, match='embeds 100 token ids'):
        encoder.get_tokenizer()


@pytest.mark.parametrize('output_dim', [0, 2.5])
def test_towers_reject_invalid_output_dim(output_dim):
    with pytest.raises(ValueError, match=f'output_dim={output_dim!r} is invalid'):
        OpenCLIPVisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=output_dim)
    with pytest.raises(ValueError, match=f'output_dim={output_dim!r} is invalid'):
        OpenCLIPTextTransformer(context_length=8, width=32, heads=2, layers=1, output_dim=output_dim)


def test_vision_transformer_lock_semantics():
    encoder = _tiny_vision_transformer()
    encoder.lock(unlocked_groups=1)
    trainable = {name for name, parameter in encoder.named_parameters() if parameter.requires_grad}
    expected = {name for name, _ in encoder.named_parameters()
                if name.startswith(('transformer.resblocks.1.', 'ln_post.')) or name == 'proj'}

    assert trainable == expected

    encoder.lock(unlocked_groups=0)
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


def test_text_transformer_lock_semantics():
    encoder = _tiny_text_transformer()
    encoder.lock(unlocked_layers=1)
    trainable = {name for name, parameter in encoder.named_parameters() if parameter.requires_grad}
    expected = {name for name, _ in encoder.named_parameters()
                if name.startswith(('transformer.resblocks.1.', 'ln_final.')) or name == 'text_projection'}

    assert trainable == expected


def test_text_transformer_lock_keeps_layer_norms_trainable():
    encoder = _tiny_text_transformer()
    encoder.lock(unlocked_layers=0, freeze_layer_norm=False)
    trainable = {name for name, parameter in encoder.named_parameters() if parameter.requires_grad}
    expected = {name for name, _ in encoder.named_parameters()
                if '.ln_1.' in name or '.ln_2.' in name or name.startswith('ln_final.')}

    assert trainable == expected


@pytest.mark.parametrize('make_encoder, lock_kwargs, message', [
    (_tiny_vision_transformer, {'unlocked_groups': 3}, 'unlocked_groups=3 but the encoder has only 2 blocks'),
    (_tiny_text_transformer, {'unlocked_layers': -1}, 'unlocked_layers=-1 is invalid'),
])
def test_towers_lock_rejects_invalid_counts(make_encoder, lock_kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_encoder().lock(**lock_kwargs)


def test_grad_checkpointing_uses_openclip_flag():
    vision = _tiny_vision_transformer()
    text = _tiny_text_transformer()
    vision.set_grad_checkpointing()
    text.set_grad_checkpointing()

    assert vision.transformer.grad_checkpointing
    assert text.transformer.grad_checkpointing

    vision.set_grad_checkpointing(False)
    assert not vision.transformer.grad_checkpointing
