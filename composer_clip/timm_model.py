"""OpenCLIP's timm vision tower as a `BaseVisionEncoder`."""

import logging
import re
from typing import List, Optional

import torch
from open_clip import timm_model as openclip_timm_model
from timm.data import resolve_model_data_config
from timm.models import group_parameters
from torch import nn

from composer_clip.base_model import BaseVisionEncoder, ImageSize

logger = logging.getLogger(__name__)

PROJECTIONS = ('linear', 'mlp', 'none', '')

# Attribute names of the repeated blocks in timm models: `blocks` (ViT, EfficientNet, MobileNet),
# `stages` (ConvNeXt, ResNetV2, RegNet-style), `layers` (Swin).
_BLOCK_ATTRIBUTES = ('blocks', 'stages', 'layers')


def find_timm_blocks(trunk: nn.Module) -> List[nn.Module]:
    """Return the repeated blocks of a timm model, in forward order.

    The children of `blocks`, `stages` or `layers` come first. ResNets give `layer1` ... `layerN`.
    Other models fall back to their longest `nn.ModuleList` or `nn.Sequential` whose children all
    share one class, or to an empty list.
    """
    for name in _BLOCK_ATTRIBUTES:
        container = getattr(trunk, name, None)
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) > 0:
            return list(container)

    numbered = []
    for name, child in trunk.named_children():
        match = re.fullmatch(r'layer(\d+)', name)
        if match:
            numbered.append((int(match.group(1)), child))
    if numbered:
        return [child for _, child in sorted(numbered, key=lambda item: item[0])]

    candidates = []
    for module in trunk.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                candidates.append(module)
    if not candidates:
        return []
    return list(max(candidates, key=len))


def timm_preprocess_cfg(trunk: nn.Module, image_size: ImageSize) -> dict:
    """Return preprocessing settings from a timm model's data config, sized to `image_size`."""
    data_config = resolve_model_data_config(trunk)

    interpolation = data_config.get('interpolation', 'bicubic')
    if interpolation not in ('bicubic', 'bilinear'):
        logger.warning(
            'timm data config of %s sets interpolation=%r, which open_clip transforms do not support; '
            'using bicubic', type(trunk).__name__, interpolation)
        interpolation = 'bicubic'

    return {
        'size': image_size,
        'mean': tuple(float(value) for value in data_config['mean']),
        'std': tuple(float(value) for value in data_config['std']),
        'interpolation': interpolation,
        'resize_mode': 'shortest',
        'fill_color': 0,
    }


def _tokens_from_features(trunk: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Return the spatial tokens `(batch, tokens, width)` of timm's `forward_features` output.

    Prefix tokens of ViTs ([CLS], registers) are dropped, and feature maps are flattened.
    """
    if features.ndim == 4:
        if getattr(trunk, 'output_fmt', 'NCHW') == 'NHWC':
            return features.flatten(1, 2)
        return features.flatten(2).transpose(1, 2)

    prefix_tokens = getattr(trunk, 'num_prefix_tokens', 0)
    return features[:, prefix_tokens:]


class TimmModel(BaseVisionEncoder, openclip_timm_model.TimmModel):
    """OpenCLIP's timm tower (`open_clip.timm_model.TimmModel`) as a `BaseVisionEncoder`.

    The arguments and state-dict keys (`trunk.`, `head.`) are OpenCLIP's, so OpenCLIP checkpoints
    load unchanged. `output_dim` is `embed_dim`. Unlike OpenCLIP, a trunk with `set_input_size`
    (ViTs) is resized to `image_size`, and `output_tokens=True` also returns the spatial tokens
    `(batch, tokens, width)` of the trunk.
    """

    def __init__(
            self,
            model_name: str,
            embed_dim: int,
            image_size: ImageSize = 224,
            pool: str = 'avg',
            proj: str = 'linear',
            proj_bias: bool = False,
            drop: float = 0.,
            drop_path: Optional[float] = None,
            patch_drop: Optional[float] = None,
            pretrained: bool = False,
            output_tokens: bool = False,
    ):
        if proj not in PROJECTIONS and proj is not None:
            raise ValueError(f'proj={proj!r} is invalid; choose one of {list(PROJECTIONS)}')
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f'embed_dim={embed_dim!r} is invalid; pass a positive integer')

        # BaseVisionEncoder.__init__ would reach OpenCLIP's __init__ through super() without its
        # arguments, so OpenCLIP's __init__ runs directly and the base attributes are set below.
        openclip_timm_model.TimmModel.__init__(
            self,
            model_name,
            embed_dim,
            image_size=image_size,
            pool=pool,
            proj=proj,
            proj_bias=proj_bias,
            drop=drop,
            drop_path=drop_path,
            patch_drop=patch_drop,
            pretrained=pretrained,
        )
        self.output_dim = embed_dim
        self.output_tokens = output_tokens

        if proj == 'none' and pool not in ('abs_attn', 'rot_attn') and self.trunk.num_features != embed_dim:
            raise ValueError(
                f"proj='none' passes through the {self.trunk.num_features} features of {model_name}, "
                f"but embed_dim is {embed_dim}; pass embed_dim={self.trunk.num_features} or proj='linear'")

        self._resize_trunk(model_name)
        square = self.image_size[0] == self.image_size[1]
        self.preprocess_cfg = timm_preprocess_cfg(self.trunk, self.image_size[0] if square else self.image_size)

        logger.info(
            'Built TimmModel %s (pretrained=%s, image_size=%s, pool=%s, proj=%s, embed_dim=%d)',
            model_name, pretrained, self.image_size, pool, proj, embed_dim)

    def _resize_trunk(self, model_name: str) -> None:
        default_size = tuple(resolve_model_data_config(self.trunk)['input_size'][-2:])
        if default_size == tuple(self.image_size):
            return

        if hasattr(self.trunk, 'set_input_size'):
            self.trunk.set_input_size(self.image_size)
            logger.info('Resized the input of %s from %s to %s', model_name, default_size, self.image_size)
        else:
            # NOTE: convolutional trunks accept any input size. A fixed-size trunk without
            # set_input_size fails in forward at a size other than its default.
            logger.info('%s has no set_input_size; its default input size is %s', model_name, default_size)

    def forward(self, images: torch.Tensor):
        """Encode images `(batch, channels, height, width)` into `(batch, embed_dim)` features."""
        if not self.output_tokens:
            return self.head(self.trunk(images))

        trunk_features = self.trunk.forward_features(images)
        features = self.head(self.trunk.forward_head(trunk_features))
        return features, _tokens_from_features(self.trunk, trunk_features)

    def block_modules(self) -> List[nn.Module]:
        """Return the repeated blocks of the trunk (see `find_timm_blocks`)."""
        return find_timm_blocks(self.trunk)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk except its last `unlocked_groups` layer groups. The head stays trainable.

        Layer groups are those of timm's `group_matcher` (for a ViT: the stem, then each block, the
        last one together with the final norm). With `freeze_bn_stats=True`, the batch norm layers of the frozen groups stay in
        eval mode, even after `train()`.
        """
        groups = group_parameters(self.trunk, self.trunk.group_matcher())
        group_ids = sorted(groups)
        if not isinstance(unlocked_groups, int) or unlocked_groups < 0 or unlocked_groups > len(group_ids):
            raise ValueError(
                f'unlocked_groups={unlocked_groups!r} is invalid; pass an integer from 0 to {len(group_ids)}')

        self.trunk.requires_grad_(False)
        unlocked_ids = group_ids[len(group_ids) - unlocked_groups:] if unlocked_groups else []
        trainable_names = [name for group_id in unlocked_ids for name in groups[group_id]]
        for name in trainable_names:
            self.trunk.get_parameter(name).requires_grad_(True)

        if freeze_bn_stats:
            trainable_modules = [self.head]
            for name in trainable_names:
                owner_name = name.rpartition('.')[0]
                trainable_modules.append(self.trunk.get_submodule(owner_name))
            self.freeze_batch_norm_stats(trainable_modules)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint activations through timm's `set_grad_checkpointing`, else each block of `block_modules()`."""
        try:
            self.trunk.set_grad_checkpointing(enable)
            return
        except (AttributeError, NotImplementedError, AssertionError) as error:
            logger.info('timm checkpointing is unavailable for %s (%r); checkpointing each block',
                        type(self.trunk).__name__, error)

        BaseVisionEncoder.set_grad_checkpointing(self, enable)

    def get_num_layers(self) -> int:
        """Return the number of repeated blocks of the trunk."""
        return len(self.block_modules())


__all__ = ['TimmModel', 'find_timm_blocks', 'timm_preprocess_cfg']
