"""Detection, records and counts of bad image-text samples.

The MDS writers and the streaming dataset classify a bad sample by the same reasons,
so the counts of a conversion and of a training run can be compared.
"""

import collections
import warnings
from typing import Any, NamedTuple, Optional, Union

from PIL import Image

from composer_clip.data.transforms import decode_image

__all__ = [
    'BAD_SAMPLE_REASONS',
    'BadSample',
    'BadSampleCounts',
    'BadSampleError',
    'check_caption',
    'check_max_bad_samples',
    'decode_sample_image',
    'exceeds_max_bad_samples',
]

# Reasons a sample is skipped while it is read for training or evaluation.
BAD_SAMPLE_REASONS = (
    'image_empty',
    'image_undecodable',
    'image_too_large',
    'caption_missing',
    'caption_empty',
)


class BadSampleError(ValueError):
    """A sample's content cannot be used; ``reason`` is one of `BAD_SAMPLE_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadSample(NamedTuple):
    """One skipped sample: its index in the dataset, its shard, the reason and the error message."""

    sample_index: int
    shard: str
    reason: str
    message: str


def decode_sample_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB, or raise `BadSampleError` with the reason.

    Images over Pillow's `Image.MAX_IMAGE_PIXELS` are rejected before their pixels are
    decoded. Pillow itself only warns between one and two times that limit, which would
    let a single sample take gigabytes of memory.
    """
    if not data:
        raise BadSampleError('image_empty', 'the image bytes are empty')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            return decode_image(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSampleError(
            'image_too_large',
            f'the image exceeds Pillow\'s limit of Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels: {error}',
        ) from error
    # Pillow raises many exception types on malformed input (OSError, ValueError,
    # SyntaxError, struct.error, ...), so any other error marks the image as undecodable.
    except Exception as error:  # noqa: BLE001
        raise BadSampleError('image_undecodable', f'the image does not decode ({type(error).__name__}: {error})') from error


def check_caption(caption: Any, where: str) -> str:
    """Return ``caption`` if it is a non-blank str; raise `BadSampleError` if it is None or blank.

    Any other type is a schema error, not a bad sample, and raises `TypeError`.
    """
    if caption is None:
        raise BadSampleError('caption_missing', 'the caption is missing (None)')
    if not isinstance(caption, str):
        raise TypeError(f'{where} has a caption of type {type(caption).__name__}; captions must be str or None')
    if not caption.strip():
        raise BadSampleError('caption_empty', f'the caption {caption!r} is empty')
    return caption


class BadSampleCounts:
    """Running counts of samples read and of bad samples per reason."""

    def __init__(self) -> None:
        self.samples_read = 0
        self.by_reason: collections.Counter[str] = collections.Counter()

    @property
    def bad(self) -> int:
        return sum(self.by_reason.values())

    def add(self, samples_read: int, by_reason: dict[str, int]) -> None:
        self.samples_read += samples_read
        self.by_reason.update({reason: count for reason, count in by_reason.items() if count})

    def state_dict(self) -> dict[str, Any]:
        return {'samples_read': self.samples_read, 'by_reason': dict(self.by_reason)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_read = int(state['samples_read'])
        self.by_reason = collections.Counter(state['by_reason'])


def check_max_bad_samples(max_bad_samples: Optional[Union[int, float]]) -> None:
    """Raise when ``max_bad_samples`` is neither None, a count >= 0, nor a fraction in (0, 1)."""
    if max_bad_samples is None:
        return
    if isinstance(max_bad_samples, bool) or not isinstance(max_bad_samples, (int, float)):
        raise TypeError(
            f'max_bad_samples={max_bad_samples!r} must be a count (int >= 0), a fraction (float in (0, 1)) or None'
        )
    if isinstance(max_bad_samples, float) and not 0.0 < max_bad_samples < 1.0:
        raise ValueError(
            f'max_bad_samples={max_bad_samples} is an invalid fraction; pass a float in (0, 1), '
            f'or an int for a count'
        )
    if isinstance(max_bad_samples, int) and max_bad_samples < 0:
        raise ValueError(f'max_bad_samples={max_bad_samples} is invalid; pass a count >= 0 (0 stops at the first)')


def exceeds_max_bad_samples(counts: BadSampleCounts, max_bad_samples: Optional[Union[int, float]]) -> bool:
    """Return whether ``counts`` are over the limit ``max_bad_samples``.

    A count limit is exceeded by its next bad sample. A fraction limits the bad samples
    over all samples read (good and bad). It is checked only once it allows at least one
    bad sample, so a single bad sample among the first few does not stop the run.
    """
    if max_bad_samples is None:
        return False
    if isinstance(max_bad_samples, int):
        return counts.bad > max_bad_samples
    allowed = max_bad_samples * counts.samples_read
    return allowed >= 1.0 and counts.bad > allowed
