"""Image decoding, RGB conversion and per-tower image transforms.

The transforms are OpenCLIP's (`open_clip.transform.image_transform_v2`), built
from a vision tower's ``preprocess_cfg`` so that training and evaluation see the
preprocessing the tower expects.
"""

import dataclasses
import io
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

__all__ = [
    'ImageTransform',
    'build_image_transform',
    'convert_to_rgb',
    'decode_image',
    'normalize_preprocess_cfg',
]

PREPROCESS_KEYS = tuple(field.name for field in dataclasses.fields(PreprocessCfg))
INTERPOLATIONS = ('bicubic', 'bilinear')
RESIZE_MODES = ('shortest', 'longest', 'squash')

# Pillow modes that carry an alpha channel. 'P' and 'L' images may instead carry a
# transparent palette index or grey level in `image.info['transparency']`.
_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'La', 'PA'})
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N'})


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) and convert them to RGB.

    The pixels are loaded before returning, so a truncated or corrupt file raises
    here (an `OSError` or another Pillow error) and not later inside a transform.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return convert_to_rgb(image)


def convert_to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a Pillow image of any mode to an RGB image.

    Transparent pixels (modes RGBA, LA, PA, and P or L images with a transparency
    entry) are composited onto ``background``, white by default, so that a cut-out
    object on a transparent canvas keeps its outline. Pillow's own
    ``convert('RGB')`` drops the alpha channel instead, which shows whatever colour
    the transparent pixels happen to store (often black). 16-bit greyscale images
    (modes I;16*) are scaled to 8 bits. An RGB image is returned unchanged.
    """
    if image.mode == 'RGB':
        return image

    if image.mode in _ALPHA_MODES or 'transparency' in image.info:
        rgba = image.convert('RGBA')
        canvas = Image.new('RGBA', rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert('RGB')

    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        grey = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        return grey.convert('RGB')

    # NOTE: modes I (32-bit integer) and F (float) have no standard value range, so
    # Pillow's conversion clips them to 0..255.
    return image.convert('RGB')


def normalize_preprocess_cfg(preprocess_cfg: Union[Mapping[str, Any], PreprocessCfg]) -> PreprocessCfg:
    """Validate a vision tower's preprocessing settings and return them as a `PreprocessCfg`.

    ``preprocess_cfg`` uses the keyword names of `open_clip.transform.PreprocessCfg`
    (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``
    and ``mode``). Missing keys take PreprocessCfg's defaults (OpenAI CLIP's mean and
    std, size 224, bicubic, shortest). Unknown keys and unsupported values raise
    ValueError.
    """
    if isinstance(preprocess_cfg, PreprocessCfg):
        settings = dataclasses.asdict(preprocess_cfg)
    elif isinstance(preprocess_cfg, Mapping):
        settings = dict(preprocess_cfg)
    else:
        raise TypeError(
            f'preprocess_cfg must be a dict or an open_clip PreprocessCfg, got {type(preprocess_cfg).__name__}; '
            f"pass the vision tower's preprocess_cfg attribute"
        )

    unknown = sorted(set(settings) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f'Unknown preprocess_cfg keys {unknown}; valid keys are {list(PREPROCESS_KEYS)}')

    mode = settings.get('mode', 'RGB')
    if mode != 'RGB':
        raise ValueError(f"preprocess_cfg mode={mode!r} is not supported; only 'RGB' images are produced")

    if 'size' in settings:
        settings['size'] = _validate_size(settings['size'])
    for name in ('mean', 'std'):
        if name in settings:
            settings[name] = _validate_channel_values(name, settings[name])

    cfg = PreprocessCfg(**settings)

    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f'preprocess_cfg interpolation={cfg.interpolation!r} is invalid; use one of {INTERPOLATIONS}')
    if cfg.resize_mode not in RESIZE_MODES:
        raise ValueError(f'preprocess_cfg resize_mode={cfg.resize_mode!r} is invalid; use one of {RESIZE_MODES}')
    if any(value <= 0 for value in cfg.std):
        raise ValueError(f'preprocess_cfg std={cfg.std!r} must be positive')

    return cfg


class ImageTransform:
    """Picklable callable that maps a Pillow image to a tensor `(3, height, width)`.

    It converts the image to RGB with `convert_to_rgb` and then applies OpenCLIP's
    transform for the given settings: random resized crop when ``is_train``,
    otherwise a deterministic resize and crop (or pad) chosen by ``resize_mode``.
    """

    def __init__(
        self,
        preprocess_cfg: Union[Mapping[str, Any], PreprocessCfg],
        is_train: bool,
        aug_cfg: Optional[Union[Mapping[str, Any], AugmentationCfg]] = None,
    ) -> None:
        self.preprocess_cfg = normalize_preprocess_cfg(preprocess_cfg)
        self.is_train = bool(is_train)
        self.aug_cfg = dict(aug_cfg) if isinstance(aug_cfg, Mapping) else aug_cfg
        self.transform: Callable[[Image.Image], torch.Tensor] = image_transform_v2(
            self.preprocess_cfg,
            is_train=self.is_train,
            aug_cfg=self.aug_cfg,
        )

    @property
    def cache_key(self) -> Optional[tuple]:
        """Key shared by transforms that always produce the same output, or None.

        Evaluation transforms are deterministic, so two of them with equal settings
        give equal tensors and a dataset may compute one for both towers. Training
        transforms draw random crops, so they have no key.
        """
        if self.is_train:
            return None
        return ('eval', *dataclasses.astuple(self.preprocess_cfg))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(convert_to_rgb(image))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(preprocess_cfg={self.preprocess_cfg}, is_train={self.is_train})'


def build_image_transform(
    preprocess_cfg: Union[Mapping[str, Any], PreprocessCfg],
    is_train: bool,
    aug_cfg: Optional[Union[Mapping[str, Any], AugmentationCfg]] = None,
) -> ImageTransform:
    """Build the image transform of one vision tower from its ``preprocess_cfg``.

    Args:
        preprocess_cfg: the tower's settings, keyed as `open_clip.transform.PreprocessCfg`
            (``size`` as int or (height, width), ``mean``, ``std``, ``interpolation``,
            ``resize_mode``, ``fill_color``).
        is_train: True for OpenCLIP's training augmentation (random resized crop),
            False for the deterministic evaluation transform.
        aug_cfg: OpenCLIP's `AugmentationCfg` or its keyword dict, used only when
            ``is_train`` is True.

    Returns:
        A picklable callable mapping any Pillow image to a tensor `(3, height, width)`.
    """
    return ImageTransform(preprocess_cfg, is_train=is_train, aug_cfg=aug_cfg)


def _validate_size(size: Any) -> Union[int, tuple[int, int]]:
    if isinstance(size, int) and size > 0:
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(side, int) and side > 0 for side in size):
        return (size[0], size[1])
    raise ValueError(f'preprocess_cfg size={size!r} is invalid; use a positive int or a (height, width) pair')


def _validate_channel_values(name: str, value: Any) -> tuple[float, float, float]:
    # OpenCLIP expands a single number to all three channels, so this does too.
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return tuple(float(channel) for channel in value)
    raise ValueError(f'preprocess_cfg {name}={value!r} is invalid; use one number or 3 values, one per RGB channel')

