"""Batching of image-text samples and the DataLoader over `StreamingImageTextDataset`."""

import logging
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from composer_clip.data.dataset import ImageTransformFn, StreamingImageTextDataset, TokenizerFn

__all__ = ['build_image_text_dataloader', 'collate_image_text']

log = logging.getLogger(__name__)

# Streaming's default shuffle seed, so that runs that leave it unset match plain Streaming.
DEFAULT_SHUFFLE_SEED = 9176


def collate_image_text(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the samples of `StreamingImageTextDataset` into a batch.

    Returns ``{'images': [Tensor (batch, C, H, W) per vision tower], 'texts':
    [LongTensor (batch, context_length) per text tower], 'sample_index': LongTensor
    (batch,), 'bad_samples': [BadSample]}``. Towers that shared one tensor per sample
    share the stacked batch too. ``bad_samples`` lists the bad samples that the
    dataset replaced while reading this batch.
    """
    if not samples:
        raise ValueError('collate_image_text got no samples; pass at least one sample')

    num_vision = len(samples[0]['images'])
    num_text = len(samples[0]['texts'])
    for position, sample in enumerate(samples):
        if len(sample['images']) != num_vision or len(sample['texts']) != num_text:
            raise ValueError(
                f'Sample {position} of the batch has {len(sample["images"])} images and {len(sample["texts"])} '
                f'texts but sample 0 has {num_vision} and {num_text}; every sample needs one input per tower'
            )

    images = _stack_per_tower([sample['images'] for sample in samples], 'vision')
    texts = _stack_per_tower([sample['texts'] for sample in samples], 'text')
    sample_index = torch.tensor([int(sample['sample_index']) for sample in samples], dtype=torch.long)
    bad_samples = [bad for sample in samples for bad in sample.get('bad_samples', ())]
    return {'images': images, 'texts': texts, 'sample_index': sample_index, 'bad_samples': bad_samples}


def build_image_text_dataloader(
    *,
    remote: Optional[str] = None,
    local: str,
    split: Optional[str] = None,
    batch_size: int,
    shuffle: bool,
    image_transforms: Sequence[ImageTransformFn],
    tokenizers: Sequence[TokenizerFn],
    drop_last: bool,
    num_workers: int = 0,
    persistent_workers: Optional[bool] = None,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
    shuffle_seed: int = DEFAULT_SHUFFLE_SEED,
    **dataset_kwargs: Any,
) -> DataLoader:
    """Build a DataLoader of image-text batches read from MDS shards.

    Args:
        remote: object-store URI or local folder of the shards; None to read the
            shards in place from ``local``.
        local: the shard folder itself when ``remote`` is None, read in place.
            Otherwise the cache folder for shards downloaded from ``remote``. Each
            dataset with a ``remote`` needs its own ``local``, because datasets that
            share a cache do not coordinate downloads and eviction.
        split: subfolder of ``remote`` and ``local`` that contains the split, if any.
        batch_size: per-device batch size. The dataset gets it too, because
            Streaming needs it for deterministic mid-epoch resumption.
        shuffle: shuffle samples (Streaming's global shuffle across shards).
        image_transforms: one callable per vision tower (Pillow image to tensor).
        tokenizers: one callable per text tower (list of captions to token ids).
        drop_last: drop the last incomplete batch. Training usually drops it so that
            every contrastive batch has ``batch_size`` samples.
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs; defaults to
            ``num_workers > 0``.
        pin_memory: defaults to True when CUDA is available.
        prefetch_factor: batches prefetched per worker; PyTorch's default when None.
        shuffle_seed: seed of Streaming's shuffle.
        **dataset_kwargs: further keyword arguments of `StreamingImageTextDataset`
            and `streaming.StreamingDataset` (``predownload``, ``cache_limit``,
            ``shuffle_algo``, ``image_key``, ...).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} is invalid; pass the per-device batch size, at least 1')
    if num_workers < 0:
        raise ValueError(f'num_workers={num_workers} is invalid; pass 0 to load in the main process')

    dataset = StreamingImageTextDataset(
        remote=remote,
        local=local,
        split=split,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        image_transforms=image_transforms,
        tokenizers=tokenizers,
        **dataset_kwargs,
    )

    if persistent_workers is None:
        persistent_workers = num_workers > 0
    if persistent_workers and num_workers == 0:
        raise ValueError('persistent_workers=True needs num_workers > 0')
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()

    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        loader_kwargs['prefetch_factor'] = prefetch_factor

    log.info('Image-text DataLoader over %s: batch_size=%d, shuffle=%s, drop_last=%s, num_workers=%d',
             remote if remote is not None else local, batch_size, shuffle, drop_last, num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_image_text,
        num_workers=num_workers,
        persistent_workers=persistent_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **loader_kwargs,
    )


def _stack_per_tower(per_sample: list[list[torch.Tensor]], side: str) -> list[torch.Tensor]:
    """Stack tower by tower, reusing one stacked tensor for towers that share inputs."""
    num_towers = len(per_sample[0])
    stacked: list[torch.Tensor] = []

    for tower in range(num_towers):
        # A tower whose tensors are the same objects as an earlier tower's (the
        # dataset shares one transform output) reuses that tower's batch.
        shared_with = None
        for earlier in range(tower):
            if all(sample[earlier] is sample[tower] for sample in per_sample):
                shared_with = earlier
                break
        if shared_with is not None:
            stacked.append(stacked[shared_with])
            continue

        shapes = {tuple(sample[tower].shape) for sample in per_sample}
        if len(shapes) > 1:
            raise ValueError(
                f'The {side} inputs of tower {tower} have different shapes {sorted(shapes)}; '
                f"the tower's transform or tokenizer must produce one fixed shape"
            )
        stacked.append(torch.stack([sample[tower] for sample in per_sample]))

    return stacked
