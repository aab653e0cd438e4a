"""Write image-text pairs as MDS shards that `StreamingImageTextDataset` reads.

Each sample has two columns: ``image`` (encoding ``bytes``) with the original
encoded file (JPEG, PNG, WebP, ...) and ``caption`` (encoding ``str``). Keeping
the original bytes avoids a lossy re-encode and lets each vision tower resize
from full resolution.
"""

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from streaming import MDSWriter

from composer_clip.data.bad_samples import BAD_SAMPLE_REASONS, BadSampleError, check_caption, decode_sample_image

__all__ = [
    'DEFAULT_SIZE_LIMIT',
    'SKIP_REASONS',
    'MDSWriteCounts',
    'write_image_text_mds',
]

log = logging.getLogger(__name__)

# Streaming's own default shard size limit (64 MiB before compression).
DEFAULT_SIZE_LIMIT = 1 << 26

# Reasons for skipping a sample, used as the keys of `MDSWriteCounts.skipped_by_reason`: the
# reasons of a read-time skip, plus two for image files given by path.
SKIP_REASONS = ('image_not_found', 'image_unreadable', *BAD_SAMPLE_REASONS)

ImageSource = Union[bytes, bytearray, memoryview, 'os.PathLike[str]']


@dataclasses.dataclass
class MDSWriteCounts:
    """Numbers of samples written and skipped by `write_image_text_mds`."""

    written: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())


def write_image_text_mds(
    samples: Iterable[Union[tuple[ImageSource, Optional[str]], Mapping[str, Any]]],
    out: Union[str, 'os.PathLike[str]', tuple[str, str]],
    *,
    compression: Optional[str] = None,
    size_limit: Optional[Union[int, str]] = DEFAULT_SIZE_LIMIT,
    hashes: Optional[list[str]] = None,
    exist_ok: bool = False,
    keep_local: bool = False,
    progress_bar: bool = False,
    max_workers: Optional[int] = None,
    image_column: str = 'image',
    caption_column: str = 'caption',
    log_every: int = 10_000,
    on_skip: Optional[Callable[[int, str], None]] = None,
) -> MDSWriteCounts:
    """Validate image-text pairs and write the valid ones as MDS shards.

    Each image is decoded with Pillow before it is written. Samples whose image is
    missing or does not decode, and samples without a caption, are skipped and
    counted per reason (see `SKIP_REASONS`). Each skip is logged at DEBUG level and
    the counts at the end at INFO (WARNING when anything was skipped). Captions are
    stripped of surrounding whitespace.

    Args:
        samples: pairs ``(image, caption)`` or mappings with ``image`` and ``caption``
            keys. ``image`` is the encoded file's bytes or a path to the file, which
            is read here. ``caption`` is a str, or None when the source has none.
        out: a local folder, an object-store URI (``s3://``, ``gs://``, ``oci://``, ...)
            or a ``(local, remote)`` pair, as `streaming.MDSWriter` takes it. A remote
            ``out`` is uploaded shard by shard.
        compression: MDS shard compression such as ``'zstd'`` or ``'zstd:7'``. JPEG
            and PNG bytes are compressed already, so shard compression usually saves
            little.
        size_limit: maximum shard size in bytes before compression (or a string such
            as ``'64mb'``), None for a single shard.
        hashes: hash algorithms recorded per shard in the index, in sorted order.
        exist_ok: delete the contents of an existing local ``out`` folder and write
            afresh; when False, a non-empty folder raises FileExistsError. A remote
            ``out`` is neither checked nor cleared: its index.json is replaced, and
            old shards that the new index does not list stay there unread.
        keep_local: with a remote ``out``, keep the local copy after upload.
        progress_bar: show Streaming's upload progress bar for a remote ``out``.
        max_workers: upload threads for a remote ``out``; Streaming's default when None.
        image_column: name of the image column.
        caption_column: name of the caption column.
        log_every: log progress after this many samples read.
        on_skip: called with the position of each skipped sample in ``samples`` and
            its reason, for callers that keep metadata aligned with the written
            samples.

    Returns:
        The numbers of samples written and skipped per reason.

    Raises:
        TypeError: when a sample is neither a pair nor a mapping with both keys, or
            its image or caption has an unsupported type.
    """
    writer_kwargs: dict[str, Any] = {'exist_ok': exist_ok, 'progress_bar': progress_bar}
    if max_workers is not None:
        writer_kwargs['max_workers'] = max_workers

    columns = {image_column: 'bytes', caption_column: 'str'}
    out_name = out if isinstance(out, (str, tuple)) else os.fspath(out)
    skipped: collections.Counter[str] = collections.Counter()
    written = 0

    log.info('Writing image-text MDS shards to %s', out_name)
    with MDSWriter(
        out=out_name,
        columns=columns,
        compression=compression,
        hashes=hashes,
        size_limit=size_limit,
        keep_local=keep_local,
        **writer_kwargs,
    ) as writer:
        for position, sample in enumerate(samples):
            image, caption = _unpack_sample(sample, position)
            image_bytes, reason = _validate_sample(image, caption, position)

            if reason is not None:
                skipped[reason] += 1
                if on_skip is not None:
                    on_skip(position, reason)
            else:
                writer.write({image_column: image_bytes, caption_column: caption.strip()})
                written += 1

            if log_every and (position + 1) % log_every == 0:
                log.info('Read %d samples: %d written, %d skipped', position + 1, written, sum(skipped.values()))

    counts = MDSWriteCounts(written=written, skipped_by_reason=dict(sorted(skipped.items())))
    if written == 0:
        log.warning('No samples were written to %s, so the dataset there has no shards', out_name)
    if counts.skipped:
        log.warning('Wrote %d samples to %s and skipped %d: %s', written, out_name, counts.skipped,
                    counts.skipped_by_reason)
    else:
        log.info('Wrote %d samples to %s', written, out_name)
    return counts


def _unpack_sample(sample: Any, position: int) -> tuple[Any, Any]:
    if isinstance(sample, Mapping):
        if 'image' not in sample or 'caption' not in sample:
            raise TypeError(f'Sample {position} has keys {sorted(sample)}; a mapping sample needs "image" and "caption"')
        return sample['image'], sample['caption']

    if isinstance(sample, tuple) and len(sample) == 2:
        return sample

    raise TypeError(
        f'Sample {position} is a {type(sample).__name__}; pass (image, caption) tuples '
        f'or mappings with "image" and "caption" keys'
    )


def _validate_sample(image: Any, caption: Any, position: int) -> tuple[Optional[bytes], Optional[str]]:
    """Return the image bytes and None, or None and the reason to skip the sample."""
    try:
        check_caption(caption, f'Sample {position}')
    except BadSampleError as error:
        log.debug('Skipping sample %d: %s', position, error)
        return None, error.reason

    if isinstance(image, (bytes, bytearray, memoryview)):
        image_bytes = bytes(image)
    elif isinstance(image, os.PathLike):
        try:
            with open(image, 'rb') as file:
                image_bytes = file.read()
        except FileNotFoundError:
            log.debug('Skipping sample %d: image file %s not found', position, os.fspath(image))
            return None, 'image_not_found'
        except OSError as error:
            log.debug('Skipping sample %d: image file %s is unreadable: %s', position, os.fspath(image), error)
            return None, 'image_unreadable'
    else:
        raise TypeError(
            f'Sample {position} has an image of type {type(image).__name__}; '
            f'pass the encoded bytes or a pathlib.Path to the file'
        )

    try:
        decode_sample_image(image_bytes)
    except BadSampleError as error:
        log.debug('Skipping sample %d: %s', position, error)
        return None, error.reason

    return image_bytes, None
