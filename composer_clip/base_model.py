"""Base classes of the vision and text encoders, and the poolers and projection heads they share.

Every encoder returns `(batch, output_dim)` features, or `((batch, output_dim), tokens)` when it
was built with `output_tokens=True`. Encoders name their repeated blocks through
`block_modules()`, so that sharding and activation checkpointing need no guessing.
"""

import abc
import contextlib
import functools
import inspect
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

ImageSize = Union[int, Tuple[int, int]]

# Vocabulary size of CLIP's byte-pair encoding, the tokenizer of `open_clip.tokenizer.SimpleTokenizer`.
CLIP_BPE_VOCAB_SIZE = 49408

# Positions of CLIP's text tower, used as the upper bound of the default context length.
DEFAULT_CONTEXT_LENGTH = 77

_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def default_preprocess_cfg(image_size: ImageSize) -> Dict[str, Any]:
    """Return OpenAI CLIP's preprocessing settings for `image_size`.

    The keys are the keyword names of `open_clip.transform.PreprocessCfg`.
    """
    return {
        'size': image_size,
        'mean': tuple(OPENAI_DATASET_MEAN),
        'std': tuple(OPENAI_DATASET_STD),
        'interpolation': 'bicubic',
        'resize_mode': 'shortest',
        'fill_color': 0,
    }


def _check_count(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'{name}={value!r} is invalid; pass a non-negative integer')
    if value > maximum:
        raise ValueError(f'{name}={value} but the encoder has only {maximum} blocks; pass at most {maximum}')


def is_norm_layer(module: nn.Module) -> bool:
    """Return True for normalisation layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm and lookalikes)."""
    return 'norm' in type(module).__name__.lower()


# Activation checkpointing of single blocks.


@contextlib.contextmanager
def _keep_batch_norm_stats(module: nn.Module):
    """Restore the running statistics of the batch norm layers in `module` on exit.

    A checkpointed block runs its forward a second time during backward. Without this, batch norm
    layers in training mode would update their running statistics twice per step.
    """
    saved = []
    for layer in module.modules():
        if isinstance(layer, _BATCH_NORM_TYPES) and layer.running_mean is not None:
            buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
            saved.append((buffers, [buffer.clone() for buffer in buffers]))

    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for buffer, copy in zip(buffers, copies):
                    buffer.copy_(copy)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward.__get__(block)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)

    # Non-reentrant checkpointing gives gradients to the block's parameters even when no input
    # requires grad, which is the case right after a frozen part of the encoder.
    return checkpoint(
        forward,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _keep_batch_norm_stats(block)),
        **kwargs,
    )


def set_module_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Turn activation checkpointing of `module`'s forward on or off.

    The module keeps its class and state-dict keys: an instance attribute `forward` wraps the
    class's forward in `torch.utils.checkpoint.checkpoint(use_reentrant=False)`.
    """
    current = module.__dict__.get('forward')
    is_checkpointed = isinstance(current, functools.partial) and current.func is _checkpointed_forward

    if enable and not is_checkpointed:
        module.forward = functools.partial(_checkpointed_forward, module)
    elif not enable and is_checkpointed:
        del module.forward


def is_module_checkpointed(module: nn.Module) -> bool:
    """Return True when `set_module_checkpointing` turned checkpointing on for `module`."""
    current = module.__dict__.get('forward')
    return isinstance(current, functools.partial) and current.func is _checkpointed_forward


def _record_frozen_batch_norms(root: nn.Module, trainable_modules: Sequence[nn.Module]) -> List[str]:
    """Return the names of the batch norm layers of `root` outside `trainable_modules`."""
    trainable_ids = {id(layer) for module in trainable_modules for layer in module.modules()}
    names = []
    for name, layer in root.named_modules():
        if isinstance(layer, _BATCH_NORM_TYPES) and id(layer) not in trainable_ids:
            names.append(name)
    return names


# Base classes.


def checkpoint_blocks(encoder: nn.Module, enable: bool) -> None:
    """Turn activation checkpointing of each block of `encoder.block_modules()` on or off."""
    blocks = encoder.block_modules()
    if not blocks and enable:
        raise NotImplementedError(
            f'{type(encoder).__name__} names no repeated blocks, so activation checkpointing has nothing '
            'to wrap; override block_modules() or set_grad_checkpointing()')
    for block in blocks:
        set_module_checkpointing(block, enable)


class BaseVisionEncoder(nn.Module, abc.ABC):
    """Base of every vision encoder: images `(batch, channels, height, width)` to `(batch, output_dim)`.

    Attributes:
        output_dim: width of the returned features.
        image_size: input resolution, an int or `(height, width)`.
        preprocess_cfg: keyword arguments of `open_clip.transform.PreprocessCfg` (`size`, `mean`,
            `std`, `interpolation`, `resize_mode`, `fill_color`).

    A subclass must implement `forward`. It may override `block_modules()` to name its repeated
    blocks, which enables `lock(unlocked_groups>0)`, `set_grad_checkpointing()` and FSDP2 units.
    """

    def __init__(self, output_dim: int, image_size: ImageSize = 224):
        super().__init__()
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f'output_dim={output_dim!r} is invalid; pass a positive integer')
        self.output_dim = output_dim
        self.image_size = image_size
        self.preprocess_cfg = default_preprocess_cfg(image_size)

    @abc.abstractmethod
    def forward(self, images: torch.Tensor):
        """Encode images `(batch, channels, height, width)` into features `(batch, output_dim)`."""

    def block_modules(self) -> List[nn.Module]:
        """Return the repeated blocks, in forward order. The base class has none."""
        return []

    def get_num_layers(self) -> int:
        """Return the number of repeated blocks."""
        return len(self.block_modules())

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze every parameter except those of the last `unlocked_groups` blocks.

        With `freeze_bn_stats=True`, the batch norm layers of the frozen part stay in eval mode,
        so their running statistics no longer change, even after `train()`.
        """
        blocks = self.block_modules()
        _check_count('unlocked_groups', unlocked_groups, len(blocks))

        self.requires_grad_(False)
        unlocked = blocks[len(blocks) - unlocked_groups:] if unlocked_groups else []
        for block in unlocked:
            block.requires_grad_(True)

        if freeze_bn_stats:
            self.freeze_batch_norm_stats(unlocked)

    def freeze_batch_norm_stats(self, trainable_modules: Sequence[nn.Module] = ()) -> None:
        """Keep the batch norm layers outside `trainable_modules` in eval mode from now on."""
        self._frozen_batch_norm_names = _record_frozen_batch_norms(self, trainable_modules)
        for name in self._frozen_batch_norm_names:
            self.get_submodule(name).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, '_frozen_batch_norm_names', ()):
            self.get_submodule(name).eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the activations of each block of `block_modules()`."""
        checkpoint_blocks(self, enable)


class BaseTextEncoder(nn.Module, abc.ABC):
    """Base of every text encoder: token ids `(batch, sequence)` to `(batch, output_dim)`.

    Attributes:
        output_dim: width of the returned features.
        vocab_size: number of token ids the encoder embeds (0 when unknown).
        context_length: sequence length produced by `get_tokenizer()`.
        pad_id: token id of padding, which the attention mask excludes.

    A subclass must implement `forward`. It may override `block_modules()` to name its repeated
    blocks, and `get_tokenizer()` when it does not use CLIP's byte-pair encoding.
    """

    def __init__(self, output_dim: int, vocab_size: int = 0, context_length: int = DEFAULT_CONTEXT_LENGTH):
        super().__init__()
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f'output_dim={output_dim!r} is invalid; pass a positive integer')
        self.output_dim = output_dim
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pad_id = 0

    @abc.abstractmethod
    def forward(self, token_ids: torch.Tensor):
        """Encode token ids `(batch, sequence)` into features `(batch, output_dim)`."""

    def get_tokenizer(self):
        """Return CLIP's byte-pair tokenizer, which maps `list[str]` to `(batch, context_length)` token ids."""
        from open_clip.tokenizer import SimpleTokenizer

        if 0 < self.vocab_size < CLIP_BPE_VOCAB_SIZE:
            raise ValueError(
                f'{type(self).__name__} embeds {self.vocab_size} token ids but CLIP\'s byte-pair tokenizer '
                f'produces ids up to {CLIP_BPE_VOCAB_SIZE - 1}; override get_tokenizer() to return the '
                'tokenizer of this encoder')
        return SimpleTokenizer(context_length=self.context_length)

    def block_modules(self) -> List[nn.Module]:
        """Return the repeated blocks, in forward order. The base class has none."""
        return []

    def get_num_layers(self) -> int:
        """Return the number of repeated blocks."""
        return len(self.block_modules())

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze every parameter except those of the last `unlocked_layers` blocks.

        With `freeze_layer_norm=False`, the normalisation layers of the frozen part stay trainable.
        """
        blocks = self.block_modules()
        _check_count('unlocked_layers', unlocked_layers, len(blocks))

        self.requires_grad_(False)
        if not freeze_layer_norm:
            for module in self.modules():
                if is_norm_layer(module):
                    module.requires_grad_(True)

        unlocked = blocks[len(blocks) - unlocked_layers:] if unlocked_layers else []
        for block in unlocked:
            block.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the activations of each block of `block_modules()`."""
        checkpoint_blocks(self, enable)


# Poolers: hidden states (batch, sequence, width) and an attention mask (batch, sequence) to
# (batch, width). A mask of None means that every position contains a token.


class ClsPooler(nn.Module):
    """Pool to the first position, the [CLS] token of BERT-style encoders and ViTs."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return hidden_states[:, 0]


class MeanPooler(nn.Module):
    """Average over the positions where the attention mask is set."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            return hidden_states.mean(dim=1)

        weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        total = (hidden_states * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1)
        return total / count


class MaxPooler(nn.Module):
    """Take the element-wise maximum over the positions where the attention mask is set."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:
            padding = ~attention_mask.bool().unsqueeze(-1)
            hidden_states = hidden_states.masked_fill(padding, torch.finfo(hidden_states.dtype).min)
        return hidden_states.max(dim=1).values


class LastTokenPooler(nn.Module):
    """Pool to the last position where the attention mask is set, as decoder-only models summarise text."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length = hidden_states.shape[:2]
        if attention_mask is None:
            return hidden_states[:, -1]

        positions = torch.arange(length, device=hidden_states.device)
        last = (attention_mask.bool() * positions).max(dim=1).values
        return hidden_states[torch.arange(batch, device=hidden_states.device), last]


POOLERS = {
    'cls': ClsPooler,
    'mean': MeanPooler,
    'max': MaxPooler,
    'last': LastTokenPooler,
}

PROJECTION_TYPES = ('linear', 'mlp', 'none')


def build_pooler(pooler_type: str) -> nn.Module:
    """Build the pooler named `pooler_type` ('cls', 'mean', 'max' or 'last')."""
    if pooler_type not in POOLERS:
        raise ValueError(f'pooler_type={pooler_type!r} is invalid; choose one of {sorted(POOLERS)}')
    return POOLERS[pooler_type]()


def check_projection_type(proj_type: str) -> None:
    """Raise ValueError unless `proj_type` is one of PROJECTION_TYPES."""
    if proj_type not in PROJECTION_TYPES:
        raise ValueError(f'proj_type={proj_type!r} is invalid; choose one of {list(PROJECTION_TYPES)}')


def build_projection(proj_type: str, input_dim: int, output_dim: int, bias: bool = False) -> nn.Module:
    """Build a projection head from `input_dim` to `output_dim` features.

    `'linear'` is one linear layer, `'mlp'` is Linear-GELU-Linear with `(input_dim + output_dim) // 2`
    hidden units, and `'none'` is the identity, which requires `input_dim == output_dim`.
    """
    check_projection_type(proj_type)

    if proj_type == 'linear':
        return nn.Linear(input_dim, output_dim, bias=bias)

    if proj_type == 'mlp':
        hidden_dim = (input_dim + output_dim) // 2
        return nn.Sequential(
            nn.Linear(input_dim, hidden_dim, bias=bias),
            nn.GELU(),
            nn.Linear(hidden_dim, output_dim, bias=bias),
        )

    if input_dim != output_dim:
        raise ValueError(
            f"proj_type='none' requires the hidden size to equal output_dim, but the hidden size is "
            f"{input_dim} and output_dim is {output_dim}; pass output_dim={input_dim} or proj_type='linear'")
    return nn.Identity()


# Helpers for transformers models.

_LAYER_PATHS = ('encoder.layer', 'encoder.layers', 'encoder.block', 'layers', 'h', 'block')


def find_transformer_layers(model: nn.Module) -> List[nn.Module]:
    """Return the repeated layers of a transformers model.

    Known attribute paths come first (`encoder.layer` in BERT, `layers` in Llama, `h` in GPT-2,
    `block` in T5). Other models fall back to their longest `nn.ModuleList`.
    """
    for path in _LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return list(layers)

    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def lock_transformer(
        transformer: nn.Module,
        layers: Sequence[nn.Module],
        unlocked_layers: int = 0,
        freeze_norm: bool = True,
) -> None:
    """Freeze the embeddings and all but the last `unlocked_layers` layers of `transformer`.

    With `unlocked_layers=0` every parameter is frozen. Otherwise the parameters registered after
    the last frozen layer (the unlocked layers and a final norm) stay trainable. This relies on the
    registration order following the data flow (embeddings, layers, final norm), as in BERT and ViT.
    With `freeze_norm=False`, the normalisation layers of the frozen part stay trainable.
    """
    _check_count('unlocked_layers', unlocked_layers, len(layers))

    frozen_names = set()
    if unlocked_layers == 0:
        frozen_names = {name for name, _ in transformer.named_parameters()}
    else:
        first_unlocked = layers[len(layers) - unlocked_layers]
        first_unlocked_ids = {id(parameter) for parameter in first_unlocked.parameters()}
        for name, parameter in transformer.named_parameters():
            if id(parameter) in first_unlocked_ids:
                break
            frozen_names.add(name)

    norm_names = set()
    if not freeze_norm:
        for module_name, module in transformer.named_modules():
            if is_norm_layer(module):
                prefix = f'{module_name}.' if module_name else ''
                norm_names.update(prefix + name for name, _ in module.named_parameters())

    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_(name not in frozen_names or name in norm_names)


def set_transformer_grad_checkpointing(transformer: nn.Module, layers: Sequence[nn.Module], enable: bool) -> None:
    """Turn activation checkpointing of a transformers model on or off.

    Models that support it use transformers' own checkpointing, with non-reentrant
    `torch.utils.checkpoint` so that layers after a frozen part still get gradients. Transformers
    checkpoints only in training mode. Other models checkpoint each of `layers`.
    """
    if getattr(transformer, 'supports_gradient_checkpointing', False):
        if enable:
            transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        else:
            transformer.gradient_checkpointing_disable()
        return

    if not layers and enable:
        raise NotImplementedError(
            f'{type(transformer).__name__} supports no gradient checkpointing and has no layer list to wrap')
    for layer in layers:
        set_module_checkpointing(layer, enable)


def get_hidden_size(config) -> int:
    """Return the width of a transformers model's hidden states from its config."""
    for name in ('hidden_size', 'd_model', 'n_embd', 'dim', 'width'):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value

    # Convolutional models (ConvNeXt, ResNet) list one width per stage.
    sizes = getattr(config, 'hidden_sizes', None)
    if sizes:
        return sizes[-1]
    raise ValueError(
        f'cannot find the hidden size in the {type(config).__name__} config; '
        'it has none of hidden_size, d_model, n_embd, dim, width, hidden_sizes')


def _accepts_add_pooling_layer(model_class: type) -> bool:
    return 'add_pooling_layer' in inspect.signature(model_class.__init__).parameters


def _model_kwargs_without_pooler(config) -> Dict[str, Any]:
    """Return `add_pooling_layer=False` for model classes that accept it.

    BERT-style models add a pooler layer that CLIP-style pooling never uses. Its parameters would
    get no gradients, which DDP reports as an error.
    """
    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        return {}
    if _accepts_add_pooling_layer(model_class):
        return {'add_pooling_layer': False}
    return {}


def remove_pooling_layer(model: nn.Module) -> bool:
    """Remove the optional pooling layer of a loaded transformers model, and return True when one was removed.

    Model classes that accept `add_pooling_layer` (BERT, ViT, Swin) store that layer as `pooler`
    and skip it in forward when it is None. Other models keep their layers.
    """
    if not _accepts_add_pooling_layer(type(model)) or getattr(model, 'pooler', None) is None:
        return False
    model.pooler = None
    return True


def load_transformers_config(model_name: str, trust_remote_code: bool):
    """Load `AutoConfig` for `model_name`; a model that needs remote code raises unless it is trusted."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if trust_remote_code or 'trust_remote_code' not in str(error):
            raise
        raise ValueError(
            f'{model_name} needs its own Python code (remote code) to load, and trust_remote_code is false. '
            f'Read that code first; to run it, set trust_remote_code: true in this encoder\'s config'
        ) from error


def load_transformers_model(
        model_name: str,
        pretrained: bool,
        trust_remote_code: bool,
        config=None,
        add_pooling_layer: bool = False,
):
    """Load `AutoModel` for `model_name` (hub name or local folder), or build it with random weights.

    Model classes that accept `add_pooling_layer` are built without their pooling layer unless
    `add_pooling_layer=True`. Encoder-decoder models return only their encoder.
    """
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    if config is None:
        config = load_transformers_config(model_name, trust_remote_code)
    kwargs = {} if add_pooling_layer else _model_kwargs_without_pooler(config)

    if pretrained:
        # transformers warns about every checkpoint weight the model leaves unused, which
        # includes the pooling layer dropped on purpose above. Report the rest here instead.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model, loading_info = AutoModel.from_pretrained(
                model_name, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
            )
        finally:
            transformers_logging.set_verbosity(verbosity)
        _log_loading_info(model_name, loading_info, pooler_dropped=bool(kwargs))
    else:
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code, **kwargs)

    if getattr(config, 'is_encoder_decoder', False):
        model = model.get_encoder()
    return model


def _log_loading_info(model_name: str, loading_info: Dict[str, Any], pooler_dropped: bool) -> None:
    unused = [key for key in loading_info.get('unexpected_keys', []) if not (pooler_dropped and 'pooler.' in key)]
    missing = loading_info.get('missing_keys', [])
    if pooler_dropped and len(unused) < len(loading_info.get('unexpected_keys', [])):
        logger.info('Left out the pooling layer of %s: CLIP-style pooling does not use it', model_name)
    if unused:
        logger.warning('%d weights of %s are not used by the model: %s', len(unused), model_name, unused[:10])
    if missing:
        logger.warning('%d weights of the model are not in %s and stay random: %s', len(missing), model_name,
                       missing[:10])


def resolve_context_length(
        model_name: str,
        requested: Optional[int],
        tokenizer_max_length: Optional[int],
        position_max_length: Optional[int],
) -> int:
    """Return `requested`, or the smallest of the two model limits and 77 when it is None."""
    limits = [length for length in (tokenizer_max_length, position_max_length) if length]
    model_max = min(limits) if limits else None

    if requested is None:
        return min([DEFAULT_CONTEXT_LENGTH] + limits)
    if requested <= 0:
        raise ValueError(f'context_length={requested} is invalid; pass a positive integer')
    if model_max is not None and requested > model_max:
        raise ValueError(
            f'context_length={requested} exceeds the {model_max} positions of {model_name}; '
            f'pass context_length={model_max} or less')
    return requested


def is_causal_language_model(config) -> bool:
    """Return True for decoder-only text models (GPT-2, Llama), whose tokens see only earlier tokens.

    A model counts as causal when its config sets `is_decoder`, or when transformers maps its
    model type to a causal language model head and not to a masked one. BERT and RoBERTa have
    both heads and count as encoders.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, 'is_decoder', False):
        return True
    model_type = getattr(config, 'model_type', None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TransformersTextEncoder(BaseTextEncoder):
    """Any transformers text model loadable with `AutoModel`, pooled and projected to `output_dim`.

    Args:
        model_name: hub name or local folder holding the model's config and tokenizer (and weights
            when `pretrained=True`).
        output_dim: width of the returned features.
        pooler_type: 'cls' (first token), 'mean' or 'max' (over non-padding tokens), or 'last'
            (last non-padding token). Decoder-only models (GPT-2, Llama) reject 'cls', because
            their first token attends only to itself.
        proj_type: 'linear', 'mlp' or 'none' (requires hidden size == output_dim).
        pretrained: load the weights; False builds the architecture from its config with random
            weights.
        context_length: tokens per text. None picks the smallest of the tokenizer's
            `model_max_length`, the config's `max_position_embeddings` and 77.
        trust_remote_code: allow models whose code ships with the checkpoint.
        output_tokens: also return the last hidden states `(batch, sequence, hidden)`.

    The attention mask is `token_ids != pad_id`, where `pad_id` is the tokenizer's pad token.
    A tokenizer without a pad token (GPT-2, Llama) pads with its eos token, so `pad_id` is the
    eos id. `get_tokenizer()` pads on the right, which keeps the positions of the real tokens
    and, in a causal model, keeps them from attending to padding.
    """

    def __init__(
            self,
            model_name: str,
            output_dim: int,
            pooler_type: str = 'cls',
            proj_type: str = 'linear',
            pretrained: bool = True,
            context_length: Optional[int] = None,
            trust_remote_code: bool = False,
            output_tokens: bool = False,
    ):
        from transformers import AutoTokenizer

        pooler = build_pooler(pooler_type)
        check_projection_type(proj_type)

        config = load_transformers_config(model_name, trust_remote_code)
        if pooler_type == 'cls' and is_causal_language_model(config):
            raise ValueError(
                f"pooler_type='cls' is invalid for the decoder-only model {model_name} ({config.model_type}), "
                "whose first token attends only to itself; pass pooler_type='mean', 'max' or 'last'")

        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        tokenizer_pad_token = None
        pad_id = tokenizer.pad_token_id
        if pad_id is None and tokenizer.eos_token_id is not None:
            # NOTE: with pad == eos, an eos token inside the text is masked like padding. Mean and
            # max pooling skip it, and 'last' pools the token before it. The GPT-2 and Llama
            # tokenizers append no eos, so plain texts lose nothing, but a recipe that appends eos
            # and pools on it (as many decoder embedding models do) cannot be reproduced here.
            tokenizer_pad_token = tokenizer.eos_token
            pad_id = tokenizer.eos_token_id
            logger.info(
                'The tokenizer of %s has no pad token; padding with its eos token %r (id %d) on the right',
                model_name, tokenizer_pad_token, pad_id)
        if pad_id is None:
            raise ValueError(
                f'the tokenizer of {model_name} has neither a pad token nor an eos token, so padding '
                'cannot be masked; choose a model whose tokenizer defines pad_token or eos_token')

        context_length = resolve_context_length(
            model_name,
            context_length,
            getattr(tokenizer, 'model_max_length', None),
            getattr(config, 'max_position_embeddings', None),
        )
        vocab_size = getattr(config, 'vocab_size', None) or len(tokenizer)
        super().__init__(output_dim, vocab_size=vocab_size, context_length=context_length)

        self.model_name = model_name
        self.trust_remote_code = trust_remote_code
        self.output_tokens = output_tokens
        self.pad_id = pad_id
        self.tokenizer_pad_token = tokenizer_pad_token
        self.transformer = load_transformers_model(model_name, pretrained, trust_remote_code, config=config)
        self.pooler = pooler
        self.proj = build_projection(proj_type, get_hidden_size(self.transformer.config), output_dim)

        logger.info(
            'Built %s from %s (pretrained=%s, pooler=%s, proj=%s, context_length=%d, pad_id=%d)',
            type(self).__name__, model_name, pretrained, pooler_type, proj_type, context_length, pad_id)

    def forward(self, token_ids: torch.Tensor):
        """Encode token ids `(batch, sequence)` into `(batch, output_dim)` features."""
        attention_mask = token_ids != self.pad_id
        outputs = self.transformer(input_ids=token_ids, attention_mask=attention_mask.long())
        hidden_states = outputs[0]

        features = self.proj(self.pooler(hidden_states, attention_mask))
        if self.output_tokens:
            return features, hidden_states
        return features

    def get_tokenizer(self):
        """Return `open_clip.tokenizer.HFTokenizer` for this model, padding on the right to `context_length`.

        A tokenizer without a pad token gets its eos token as pad token (see the class docstring).
        """
        from open_clip.tokenizer import HFTokenizer

        kwargs = {'padding_side': 'right'}
        if self.trust_remote_code:
            kwargs['trust_remote_code'] = True
        if self.tokenizer_pad_token is not None:
            kwargs['pad_token'] = self.tokenizer_pad_token
        return HFTokenizer(self.model_name, context_length=self.context_length, **kwargs)

    def block_modules(self) -> List[nn.Module]:
        """Return the transformer layers (see `find_transformer_layers`)."""
        return find_transformer_layers(self.transformer)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the embeddings and all but the last `unlocked_layers` layers. The projection stays trainable."""
        lock_transformer(self.transformer, self.block_modules(), unlocked_layers, freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the activations of each transformer layer."""
        set_transformer_grad_checkpointing(self.transformer, self.block_modules(), enable)


_PIL_RESAMPLE_NAMES = {2: 'bilinear', 3: 'bicubic'}


def _transformers_preprocess_cfg(model_name: str, image_size: ImageSize, trust_remote_code: bool) -> Dict[str, Any]:
    """Return preprocessing settings from the model's image processor, or CLIP's defaults without one."""
    from transformers import AutoImageProcessor

    cfg = default_preprocess_cfg(image_size)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        logger.info('No image processor found for %s (%s); using OpenAI CLIP mean and std', model_name, error)
        return cfg

    mean = getattr(processor, 'image_mean', None)
    std = getattr(processor, 'image_std', None)
    if mean is not None and std is not None:
        cfg['mean'] = tuple(float(value) for value in mean)
        cfg['std'] = tuple(float(value) for value in std)

    resample = getattr(processor, 'resample', None)
    cfg['interpolation'] = _PIL_RESAMPLE_NAMES.get(int(resample) if resample is not None else 3, 'bicubic')
    return cfg


VISION_POOLER_TYPES = ('cls', 'mean', 'max')

# Attributes of the embedding modules of transformers vision models that hold a class token:
# `cls_token` in ViT, DeiT, BEiT and DINOv2, `class_embedding` in CLIP and BLIP.
_CLASS_TOKEN_ATTRIBUTES = ('cls_token', 'class_embedding')


def count_prefix_tokens(model: nn.Module) -> int:
    """Return how many tokens a transformers vision model places before its patch tokens.

    The class token counts, and so do DeiT's distillation token and the register tokens of
    DINOv2 with registers and DINOv3, which follow it. Models without a class token (ConvNeXt,
    Swin, SigLIP) have none.
    """
    for module in model.modules():
        has_class_token = any(
            isinstance(getattr(module, name, None), nn.Parameter) for name in _CLASS_TOKEN_ATTRIBUTES)
        if not has_class_token:
            continue

        count = 1
        if isinstance(getattr(module, 'distillation_token', None), nn.Parameter):
            count += 1
        registers = getattr(module, 'register_tokens', None)
        if isinstance(registers, nn.Parameter):
            count += registers.shape[-2]
        return count
    return 0


def _has_position_embeddings(model: nn.Module) -> bool:
    return any('position_embedding' in name or 'pos_embed' in name for name, _ in model.named_parameters())


def _as_pair(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return tuple(size)


class TransformersVisionEncoder(BaseVisionEncoder):
    """Any transformers vision model loadable with `AutoModel`, pooled and projected to `output_dim`.

    Args:
        model_name: hub name or local folder holding the model's config (and weights when
            `pretrained=True`, and preprocessing settings when it has an image processor).
        output_dim: width of the returned features.
        image_size: input resolution. A randomly initialised model is built for it. A pretrained
            model with position embeddings that was trained at another size must accept
            `interpolate_pos_encoding` in forward. Convolutional models accept any size.
        pooler_type: 'cls', 'mean' or 'max' (see below).
        proj_type: 'linear', 'mlp' or 'none' (requires hidden size == output_dim).
        pretrained: load the weights; False builds the architecture from its config.
        trust_remote_code: allow models whose code ships with the checkpoint.
        output_tokens: also return the spatial tokens `(batch, tokens, hidden)`.

    Pooling:
        - 'cls' takes the class token (position 0 of the last hidden state) of models that have
          one (ViT, DeiT, BEiT, DINOv2, CLIP). Models without a class token (ConvNeXt, Swin,
          SigLIP) return their own pooled output (`pooler_output`) instead: for ConvNeXt the
          layer norm of the spatial mean, for Swin the spatial mean, for SigLIP its attention
          pooling head.
        - 'mean' and 'max' reduce over the spatial tokens only: the patch tokens without the
          class, distillation and register tokens, or the `h * w` positions of a feature map
          `(batch, channels, h, w)`.

    The spatial tokens are also what `output_tokens=True` returns. A pooling layer that the
    chosen pooler does not use (ViT's dense-tanh pooler, Swin's pooler under 'mean') is removed.
    Parameters that the pooled features do not depend on (DINOv2's mask token, ConvNeXt's final
    layer norm under 'mean') stay in the state dict but are frozen, and `lock` keeps them frozen.
    Their names are in `unused_parameter_names`. Finding them costs one forward and backward pass
    of a blank image when the encoder is built.
    """

    def __init__(
            self,
            model_name: str,
            output_dim: int,
            image_size: ImageSize = 224,
            pooler_type: str = 'cls',
            proj_type: str = 'linear',
            pretrained: bool = True,
            trust_remote_code: bool = False,
            output_tokens: bool = False,
    ):
        if pooler_type not in VISION_POOLER_TYPES:
            raise ValueError(
                f'pooler_type={pooler_type!r} is invalid for a vision encoder; '
                f'choose one of {list(VISION_POOLER_TYPES)}')
        check_projection_type(proj_type)
        super().__init__(output_dim, image_size=image_size)

        config = load_transformers_config(model_name, trust_remote_code)
        config_size = getattr(config, 'image_size', None)
        needs_other_size = config_size is not None and _as_pair(config_size) != _as_pair(image_size)
        if needs_other_size and not pretrained:
            config.image_size = image_size if isinstance(image_size, int) else tuple(image_size)

        self.model_name = model_name
        self.pooler_type = pooler_type
        self.output_tokens = output_tokens
        self.transformer = load_transformers_model(
            model_name, pretrained, trust_remote_code, config=config, add_pooling_layer=True)
        self.num_prefix_tokens = count_prefix_tokens(self.transformer)
        if self.num_prefix_tokens > 0 or pooler_type != 'cls':
            remove_pooling_layer(self.transformer)

        self.interpolate_pos_encoding = False
        if needs_other_size and pretrained:
            forward_parameters = inspect.signature(self.transformer.forward).parameters
            if 'interpolate_pos_encoding' in forward_parameters:
                self.interpolate_pos_encoding = True
            elif _has_position_embeddings(self.transformer):
                raise ValueError(
                    f'{model_name} was trained at image_size={config_size} and its model cannot interpolate '
                    f'position embeddings for image_size={image_size}; pass image_size={config_size}')

        self.pooler = build_pooler(pooler_type)
        self.proj = build_projection(proj_type, get_hidden_size(self.transformer.config), output_dim)
        self.preprocess_cfg = _transformers_preprocess_cfg(model_name, image_size, trust_remote_code)

        # Parameters that the pooled features do not depend on (DINOv2's mask token, ConvNeXt's
        # final layer norm under 'mean') would get no gradients, which DDP reports as an error.
        self.unused_parameter_names = self._find_unused_parameters()
        self._freeze_unused_parameters()

        logger.info(
            'Built %s from %s (pretrained=%s, image_size=%s, pooler=%s, prefix tokens=%d, proj=%s)',
            type(self).__name__, model_name, pretrained, image_size, pooler_type, self.num_prefix_tokens, proj_type)

    def forward(self, images: torch.Tensor):
        """Encode images `(batch, channels, height, width)` into `(batch, output_dim)` features."""
        pooled, tokens = self._pool(images)
        features = self.proj(pooled)
        if self.output_tokens:
            return features, tokens
        return features

    def _pool(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the pooled features `(batch, hidden)` and the spatial tokens `(batch, tokens, hidden)`."""
        kwargs = {'interpolate_pos_encoding': True} if self.interpolate_pos_encoding else {}
        outputs = self.transformer(pixel_values=images, **kwargs)
        hidden_states = outputs[0]

        if hidden_states.ndim == 4:
            tokens = hidden_states.flatten(2).transpose(1, 2)
        else:
            tokens = hidden_states[:, self.num_prefix_tokens:]

        if self.pooler_type == 'cls':
            pooled = self._pool_class_token(outputs, hidden_states)
        else:
            pooled = self.pooler(tokens)
        return pooled, tokens

    def _find_unused_parameters(self) -> List[str]:
        """Return the names of the transformer parameters that the pooled features do not depend on.

        One forward and backward pass of a blank image at `image_size`, in eval mode, finds them.
        This also checks that the model returns what `pooler_type` needs.
        """
        parameters = {
            name: parameter for name, parameter in self.transformer.named_parameters() if parameter.requires_grad}
        reference = next(iter(parameters.values()))
        height, width = _as_pair(self.image_size)
        channels = getattr(self.transformer.config, 'num_channels', 3)
        images = torch.zeros(1, channels, height, width, device=reference.device, dtype=reference.dtype)

        was_training = self.transformer.training
        self.transformer.eval()
        try:
            with torch.enable_grad():
                pooled, _ = self._pool(images)
                gradients = torch.autograd.grad(pooled.sum(), list(parameters.values()), allow_unused=True)
        finally:
            self.transformer.train(was_training)

        unused = [name for name, gradient in zip(parameters, gradients) if gradient is None]
        if unused:
            logger.info(
                'Froze %d parameters of %s that pooler_type=%r does not use: %s',
                len(unused), self.model_name, self.pooler_type, unused)
        return unused

    def _freeze_unused_parameters(self) -> None:
        for name in self.unused_parameter_names:
            self.transformer.get_parameter(name).requires_grad_(False)

    def _pool_class_token(self, outputs, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.num_prefix_tokens > 0 and hidden_states.ndim == 3:
            return hidden_states[:, 0]

        pooled = getattr(outputs, 'pooler_output', None)
        if pooled is None:
            raise ValueError(
                f"{self.model_name} has no class token and returns no pooled output, so pooler_type='cls' "
                "has nothing to take; pass pooler_type='mean' or 'max'")
        # ResNet-style models return their pooled output as (batch, channels, 1, 1).
        return pooled.flatten(1)

    def block_modules(self) -> List[nn.Module]:
        """Return the transformer layers, or the stages of convolutional models (see `find_transformer_layers`)."""
        return find_transformer_layers(self.transformer)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the embeddings and all but the last `unlocked_groups` layers. The projection stays trainable."""
        layers = self.block_modules()
        lock_transformer(self.transformer, layers, unlocked_groups, freeze_norm=True)
        self._freeze_unused_parameters()
        if freeze_bn_stats:
            unlocked = layers[len(layers) - unlocked_groups:] if unlocked_groups else []
            self.freeze_batch_norm_stats(list(unlocked) + [self.proj])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the activations of each transformer layer."""
        set_transformer_grad_checkpointing(self.transformer, self.block_modules(), enable)
