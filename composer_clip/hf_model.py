"""OpenCLIP's HuggingFace text tower as a `BaseTextEncoder`."""

import logging
from typing import List, Optional

import torch
from open_clip import hf_model as openclip_hf_model
from torch import nn

from composer_clip.base_model import (
    BaseTextEncoder,
    MaxPooler,
    find_transformer_layers,
    get_hidden_size,
    lock_transformer,
    resolve_context_length,
    set_transformer_grad_checkpointing,
)

logger = logging.getLogger(__name__)

# Projection types of OpenCLIP's HFTextEncoder. None means identity, which needs width == output_dim.
PROJECTION_TYPES = (None, 'linear', 'mlp')


class _MaskedMaxPooler(nn.Module):
    """Max pooling over non-padding tokens with the interface of OpenCLIP's HF poolers.

    open_clip 3.3.0's MaxPooler raises on the integer attention mask that its HFTextEncoder passes,
    and with a boolean mask it fills the real tokens, not the padding, before taking the maximum.
    """

    def __init__(self):
        super().__init__()
        self.max_pooler = MaxPooler()

    def forward(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.max_pooler(outputs.last_hidden_state, attention_mask)


class HFTextEncoder(BaseTextEncoder, openclip_hf_model.HFTextEncoder):
    """OpenCLIP's HF text tower (`open_clip.hf_model.HFTextEncoder`) as a `BaseTextEncoder`.

    The arguments and state-dict keys (`transformer.`, `proj.`) are OpenCLIP's, so OpenCLIP
    checkpoints load unchanged. `pooler_type` is one of OpenCLIP's ('cls_pooler', 'mean_pooler',
    'max_pooler', 'cls_last_hidden_state_pooler'), and None picks the default of the model type
    in `open_clip.hf_configs.arch_dict`, which also limits the supported model types. For other
    models use `TransformersTextEncoder`.

    Differences from OpenCLIP: `context_length` is the tokenizer's length (None picks the smaller
    of `max_position_embeddings` and 77), 'max_pooler' ignores padding, and `lock` and
    `set_grad_checkpointing` work for every supported model type.
    """

    def __init__(
            self,
            model_name_or_path: str,
            output_dim: int,
            config=None,
            pooler_type: Optional[str] = None,
            proj_type: Optional[str] = None,
            pretrained: bool = True,
            output_tokens: bool = False,
            context_length: Optional[int] = None,
    ):
        if proj_type not in PROJECTION_TYPES:
            raise ValueError(f'proj_type={proj_type!r} is invalid; choose one of {list(PROJECTION_TYPES)}')
        if pooler_type is not None and pooler_type not in openclip_hf_model._POOLERS:
            raise ValueError(
                f'pooler_type={pooler_type!r} is invalid; choose one of {sorted(openclip_hf_model._POOLERS)} or None')

        # BaseTextEncoder.__init__ would reach OpenCLIP's __init__ through super() without its
        # arguments, so OpenCLIP's __init__ runs directly and the base attributes are set below.
        openclip_hf_model.HFTextEncoder.__init__(
            self,
            model_name_or_path,
            output_dim,
            config=config,
            pooler_type=pooler_type,
            proj_type=proj_type,
            pretrained=pretrained,
            output_tokens=output_tokens,
        )

        if not hasattr(self, 'proj'):
            width = get_hidden_size(self.config)
            raise ValueError(
                f'proj_type=None keeps the {width} features of {model_name_or_path}, but output_dim is '
                f"{output_dim}; pass output_dim={width} or proj_type='linear'")
        if isinstance(self.pooler, openclip_hf_model.MaxPooler):
            self.pooler = _MaskedMaxPooler()

        self.model_name_or_path = model_name_or_path
        self.pad_id = self.config.pad_token_id
        self.context_length = resolve_context_length(
            model_name_or_path,
            context_length,
            None,
            getattr(self.config, 'max_position_embeddings', None),
        )

        logger.info(
            'Built HFTextEncoder %s (pretrained=%s, pooler=%s, proj=%s, context_length=%d)',
            model_name_or_path, pretrained, type(self.pooler).__name__, proj_type, self.context_length)

    def forward(self, token_ids: torch.Tensor):
        """Encode token ids `(batch, sequence)` into `(batch, output_dim)` features (OpenCLIP's forward)."""
        return openclip_hf_model.HFTextEncoder.forward(self, token_ids)

    def get_tokenizer(self):
        """Return `open_clip.tokenizer.HFTokenizer` for this model, padding to `context_length`."""
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(self.model_name_or_path, context_length=self.context_length)

    def block_modules(self) -> List[nn.Module]:
        """Return the transformer layers (see `composer_clip.base_model.find_transformer_layers`)."""
        return find_transformer_layers(self.transformer)

    def get_num_layers(self) -> int:
        """Return the number of transformer layers."""
        return len(self.block_modules())

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the embeddings and all but the last `unlocked_layers` layers. The projection stays trainable.

        With `freeze_layer_norm=False`, the norm layers of the frozen part stay trainable.
        """
        lock_transformer(self.transformer, self.block_modules(), unlocked_layers, freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the activations of each transformer layer."""
        set_transformer_grad_checkpointing(self.transformer, self.block_modules(), enable)
