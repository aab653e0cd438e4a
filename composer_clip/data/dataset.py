"""Streaming image-text dataset with one input per vision tower and per text tower."""

import logging
import os
from typing import Any, Callable, Hashable, Sequence

import torch
from PIL import Image
from streaming import StreamingDataset

from composer_clip.data.bad_samples import BadSample, BadSampleError, check_caption, decode_sample_image
from composer_clip.data.transforms import convert_to_rgb

__all__ = ['StreamingImageTextDataset']

log = logging.getLogger(__name__)

ImageTransformFn = Callable[[Image.Image], torch.Tensor]
TokenizerFn = Callable[[list[str]], torch.Tensor]


class StreamingImageTextDataset(StreamingDataset):
    """Image-caption pairs from MDS shards, transformed for each vision tower and tokenized for each text tower.

    Each sample is decoded once and converted to RGB (transparent pixels composited on
    white, see `convert_to_rgb`). Then every vision tower's transform and every text
    tower's tokenizer is applied. Towers that share a transform object, or evaluation
    transforms built by `build_image_transform` from equal settings, get the same
    tensor computed once. A training transform draws one random crop per call, so pass
    distinct transform objects when towers should see independent crops.

    When ``remote`` is None, ``local`` is the folder that contains the shards and they
    are read in place; several datasets may read one folder. With a ``remote``,
    ``local`` is a download cache that each dataset needs for itself, because two
    datasets on one cache do not share download locks or eviction accounting.
    NOTE: Streaming 0.13.0 raises "Reused local directory" for a shared cache only
    until the first dataset starts iterating. From then on its file lock files make
    the check skip that dataset, so the check does not catch every case.

    Args:
        image_transforms: one callable per vision tower, mapping an RGB Pillow image to
            a tensor `(channels, height, width)`.
        tokenizers: one callable per text tower, mapping a list of captions to token
            ids `(len(captions), context_length)`, such as the tokenizer from
            `open_clip.get_tokenizer` or a text encoder's ``get_tokenizer()``.
        image_key: name of the image column (encoded image bytes).
        caption_key: name of the caption column (str).
        **kwargs: keyword arguments of `streaming.StreamingDataset`: ``remote``,
            ``local``, ``split``, ``shuffle``, ``shuffle_seed``, ``batch_size`` (the
            per-device batch size, which deterministic resumption needs),
            ``predownload``, ``cache_limit``, ``streams``, ...

    A sample is ``{'images': [Tensor (C, H, W) per vision tower], 'texts':
    [LongTensor (context_length,) per text tower], 'sample_index': int,
    'bad_samples': [BadSample]}``, where ``sample_index`` is the sample's index in the
    dataset. ``bad_samples`` is empty, or contains the bad sample that this one replaces.
    """

    def __init__(
        self,
        *,
        image_transforms: Sequence[ImageTransformFn],
        tokenizers: Sequence[TokenizerFn],
        image_key: str = 'image',
        caption_key: str = 'caption',
        **kwargs: Any,
    ) -> None:
        image_transforms = _validate_callables('image_transforms', image_transforms, 'vision tower')
        tokenizers = _validate_callables('tokenizers', tokenizers, 'text tower')

        super().__init__(**kwargs)

        self.image_transforms = image_transforms
        self.tokenizers = tokenizers
        self.image_key = image_key
        self.caption_key = caption_key

        # Each tower points into a list of distinct callables, so that shared or
        # equivalent ones run once per sample.
        self._unique_transforms, self._transform_slots = _group_callables(image_transforms, _transform_cache_key)
        self._unique_tokenizers, self._tokenizer_slots = _group_callables(tokenizers, id)
        # Transforms with a cache key always give the same output, so they need no seeding.
        self._transforms_are_deterministic = all(
            getattr(transform, 'cache_key', None) is not None for transform in self._unique_transforms
        )

        self._check_columns()
        log.info(
            'Streaming image-text dataset: %d samples, %d vision towers (%d distinct transforms), %d text towers',
            self.size, len(image_transforms), len(self._unique_transforms), len(tokenizers),
        )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """Read, decode and transform the sample at ``sample_id``.

        `StreamingDataset.__getitem__` and iteration both call this method. A bad
        sample (see `BAD_SAMPLE_REASONS`) is replaced by the next good sample of its
        shard, so that every batch keeps its size on every rank, which the cross-rank
        feature gather of the contrastive loss needs. The replacement is the same on
        every read, so resumed runs see the same data. The returned sample then lists
        the bad one under ``'bad_samples'`` for counting.
        """
        sample_index = int(sample_id)
        try:
            item = self._read_sample(sample_index, retry)
        except BadSampleError as error:
            bad_sample = BadSample(sample_index, self._shard_path_of(sample_index), error.reason, str(error))
            log.debug('Skipping bad sample %d of %s: %s', sample_index, bad_sample.shard, error)
            item = self._read_substitute(sample_index, retry)
            item['bad_samples'] = [bad_sample]
            return item

        item['bad_samples'] = []
        return item

    def _read_substitute(self, sample_index: int, retry: int) -> dict[str, Any]:
        """Read the first good sample after ``sample_index`` in its shard, wrapping around."""
        shard_id, offset = self.spanner[sample_index]
        shard_start = sample_index - offset
        shard_size = int(self.samples_per_shard[shard_id])
        for step in range(1, shard_size):
            candidate = shard_start + (offset + step) % shard_size
            try:
                return self._read_sample(candidate, retry)
            except BadSampleError:
                continue
        raise ValueError(
            f'All {shard_size} samples of shard {self._shard_path_of(sample_index)} are bad, so sample '
            f'{sample_index} has no replacement; check the shard, for example with write_image_text_mds'
        )

    def _read_sample(self, sample_index: int, retry: int) -> dict[str, Any]:
        sample = super().get_item(sample_index, retry=retry)

        for key in (self.image_key, self.caption_key):
            if key not in sample:
                raise KeyError(
                    f'Sample {sample_index} has no column {key!r}; it has columns {sorted(sample)}. '
                    f'Pass image_key and caption_key that match the shards.'
                )

        caption = check_caption(sample[self.caption_key], f'Sample {sample_index} (column {self.caption_key!r})')
        image = self._decode(sample[self.image_key], sample_index)

        if self._transforms_are_deterministic:
            unique_images = [transform(image) for transform in self._unique_transforms]
        else:
            # Random augmentations draw from a generator seeded by (shuffle seed, epoch, sample), so a
            # sample gets the same crop whichever worker loads it and whether or not the run resumed.
            # Only the CPU generator is seeded: torch.manual_seed also queues CUDA seeding, which
            # costs about 8% of a sample's load time in DataLoader workers (torch 2.7,
            # scripts/benchmarks/data_pipeline.py).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self._augmentation_seed(sample_index))
                unique_images = [transform(image) for transform in self._unique_transforms]
        unique_texts = [self._tokenize(tokenizer, caption, sample_index) for tokenizer in self._unique_tokenizers]

        return {
            'images': [unique_images[slot] for slot in self._transform_slots],
            'texts': [unique_texts[slot] for slot in self._tokenizer_slots],
            'sample_index': sample_index,
        }

    def _augmentation_seed(self, sample_index: int) -> int:
        epoch = max(int(self.next_epoch) - 1, 0)
        return ((self.shuffle_seed * 1_000_003 + epoch) * 1_000_000_007 + sample_index) % 2**63

    def _decode(self, value: Any, sample_index: int) -> Image.Image:
        if isinstance(value, Image.Image):
            # Shards written with Streaming's 'pil', 'jpeg' or 'png' encodings contain decoded images.
            return convert_to_rgb(value)

        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f'Sample {sample_index} has a {type(value).__name__} in column {self.image_key!r}; '
                f'the image column must contain encoded image bytes'
            )

        return decode_sample_image(bytes(value))

    @staticmethod
    def _tokenize(tokenizer: TokenizerFn, caption: str, sample_index: int) -> torch.Tensor:
        token_ids = torch.as_tensor(tokenizer([caption]))
        if token_ids.dim() != 2 or token_ids.shape[0] != 1:
            raise ValueError(
                f'Tokenizer {tokenizer!r} returned shape {tuple(token_ids.shape)} for one caption '
                f'(sample {sample_index}); a tokenizer must return (len(captions), context_length)'
            )
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f'Tokenizer {tokenizer!r} returned dtype {token_ids.dtype}; token ids must be integers')
        return token_ids[0].long()

    def _check_columns(self) -> None:
        """Raise early when a shard lacks the image or caption column."""
        for shard in self.shards:
            column_names = getattr(shard, 'column_names', None)
            if column_names is None:
                continue
            missing = [key for key in (self.image_key, self.caption_key) if key not in column_names]
            if missing:
                raise ValueError(
                    f'Shard {_shard_path(shard)} has no column(s) '
                    f'{missing}; it has columns {list(column_names)}. Pass image_key and caption_key '
                    f'that match the shards.'
                )

    def _shard_path_of(self, sample_index: int) -> str:
        shard_id, _ = self.spanner[sample_index]
        return _shard_path(self.shards[shard_id])


def _shard_path(shard: Any) -> str:
    """Return the path of a shard's file as the dataset reads it (remote or local folder)."""
    return os.path.join(shard.dirname, shard.split or '', shard.file_pairs[0][0].basename)


def _validate_callables(name: str, values: Any, tower_kind: str) -> list:
    if callable(values) or not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f'{name} must be a list with one callable per {tower_kind}, got {type(values).__name__}')
    if not values:
        raise ValueError(f'{name} is empty; pass one callable per {tower_kind}')
    for index, value in enumerate(values):
        if not callable(value):
            raise TypeError(f'{name}[{index}] is a {type(value).__name__}, not a callable')
    return list(values)


def _transform_cache_key(transform: ImageTransformFn) -> Hashable:
    key = getattr(transform, 'cache_key', None)
    if key is None:
        return id(transform)
    return key


def _group_callables(values: list, key_fn: Callable[[Any], Hashable]) -> tuple[list, list[int]]:
    """Return the distinct callables and, per input position, the index of its distinct callable."""
    unique: list = []
    slots: list[int] = []
    slot_by_key: dict[Hashable, int] = {}

    for value in values:
        key = key_fn(value)
        if key not in slot_by_key:
            slot_by_key[key] = len(unique)
            unique.append(value)
        slots.append(slot_by_key[key])

    return unique, slots
