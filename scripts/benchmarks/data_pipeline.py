"""Samples per second of the streaming image-text loader against a plain loader over image files.

The script writes synthetic JPEG images (random smooth colour fields with noise) and
their captions into a temporary folder, and the same pairs as MDS shards with
`write_image_text_mds`. Both loaders then produce the batches of one vision tower and
one text tower, with the same transform (`build_image_transform` with OpenAI CLIP's
settings at 224 px) and the same tokenizer (OpenCLIP's for ViT-B-32):

- streaming: `build_image_text_dataloader` over the MDS shards, read in place.
- plain: a `torch.utils.data.Dataset` that opens each image file with Pillow, converts it
  to RGB, applies the transform and tokenizes the caption (held in memory), under a
  `torch.utils.data.DataLoader` with persistent workers.

One repetition is one full epoch, from creating the iterator to the last batch; the
time to the first batch is reported too. The first epoch of each loader starts its
workers and is not timed. The two loaders
alternate epoch by epoch, in reversed order every other repetition, so that changes in
machine load reach both alike. Before timing, the script checks that both loaders
return the same image tensors and token ids for the samples of their first batch.

    python scripts/benchmarks/data_pipeline.py
    python scripts/benchmarks/data_pipeline.py --workers 2 --train-transform --out data.json
    python scripts/benchmarks/data_pipeline.py --quick
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import write_summary  # noqa: E402
from composer_clip.base_model import default_preprocess_cfg  # noqa: E402
from composer_clip.data import build_image_text_dataloader, build_image_transform, write_image_text_mds  # noqa: E402

VARIANTS = ('streaming', 'plain')
TOKENIZER_MODEL = 'ViT-B-32'
COLOUR_NAMES = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'grey', 'brown')


def write_images(folder: Path, num_images: int, image_size: int, seed: int = 0) -> list[tuple[Path, str]]:
    """Write `num_images` JPEGs of `image_size` px and return their (path, caption) pairs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(num_images):
        # A coarse random colour field, upsampled, plus pixel noise. At 256 px and quality 90 a file has about 29 KiB.
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-24, 25, size=field.shape, dtype=np.int16)
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)

        path = folder / f'{index:05d}.jpg'
        Image.fromarray(pixels).save(path, quality=90)
        colour = COLOUR_NAMES[index % len(COLOUR_NAMES)]
        pairs.append((path, f'a synthetic picture number {index} with mostly {colour} patches'))
    return pairs


class ImageFileDataset(Dataset):
    """Image files and captions held in memory, decoded and transformed on each access."""

    def __init__(self, pairs: list[tuple[Path, str]], transform, tokenizer):
        self.paths = [path for path, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as image:
            image = image.convert('RGB')
        return {
            'images': self.transform(image),
            'texts': self.tokenizer([self.captions[index]])[0],
            'sample_index': index,
        }


def build_loaders(pairs, mds_folder: str, batch_size: int, num_workers: int, train_transform: bool):
    transform = build_image_transform(default_preprocess_cfg(224), is_train=train_transform)
    tokenizer = open_clip.get_tokenizer(TOKENIZER_MODEL)
    streaming = build_image_text_dataloader(
        local=mds_folder,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        image_transforms=[transform],
        tokenizers=[tokenizer],
    )
    plain = DataLoader(
        ImageFileDataset(pairs, transform, tokenizer),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return {'streaming': streaming, 'plain': plain}


def batch_fields(variant: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (images, token ids, sample indices) of a batch of either loader."""
    if variant == 'streaming':
        return batch['images'][0], batch['texts'][0], batch['sample_index']
    return batch['images'], batch['texts'], batch['sample_index']


def compare_first_batches(loaders: dict, train_transform: bool) -> dict:
    """Compare each loader's first batch with the plain dataset's own samples.

    Also serves as the untimed first epoch that starts the workers. Returns the number
    of samples compared, the largest image difference and the number of token rows that
    differ. Random crops differ between the loaders, so a training transform skips the
    image comparison.
    """
    reference = loaders['plain'].dataset
    compared, max_image_difference, token_mismatches = 0, 0.0, 0
    for variant, loader in loaders.items():
        for position, batch in enumerate(loader):
            if position > 0:
                continue
            images, texts, indices = batch_fields(variant, batch)
            for row, index in enumerate(indices.tolist()):
                expected = reference[index]
                if not train_transform:
                    difference = (images[row] - expected['images']).abs().max().item()
                    max_image_difference = max(max_image_difference, difference)
                token_mismatches += int(not torch.equal(texts[row], expected['texts']))
                compared += 1
    return {
        'samples_compared': compared,
        'max_image_difference': None if train_transform else max_image_difference,
        'token_mismatches': token_mismatches,
    }


def time_epoch(variant: str, loader) -> dict:
    """Iterate one epoch and return its timings and sample counts."""
    indices = []
    start = time.perf_counter()
    first_batch_seconds = None
    for batch in loader:
        if first_batch_seconds is None:
            first_batch_seconds = time.perf_counter() - start
        indices.append(batch_fields(variant, batch)[2])
    seconds = time.perf_counter() - start
    samples = sum(len(batch_indices) for batch_indices in indices)
    return {
        'samples_per_second': samples / seconds,
        # The rate after the first batch leaves out the start of the epoch, which a
        # long epoch pays only once.
        'steady_samples_per_second': (samples - len(indices[0])) / (seconds - first_batch_seconds),
        'first_batch_seconds': first_batch_seconds,
        'samples': samples,
        'distinct_samples': len(set(torch.cat(indices).tolist())),
    }


def measure(pairs, mds_folder: str, batch_size: int, num_workers: int, repeats: int, train_transform: bool) -> dict:
    loaders = build_loaders(pairs, mds_folder, batch_size, num_workers, train_transform)
    check = compare_first_batches(loaders, train_transform)

    epochs = {name: [] for name in VARIANTS}
    for repetition in range(repeats):
        order = VARIANTS if repetition % 2 == 0 else VARIANTS[::-1]
        for name in order:
            epochs[name].append(time_epoch(name, loaders[name]))

    def median_of(key: str) -> dict[str, float]:
        return {name: statistics.median(epoch[key] for epoch in epochs[name]) for name in VARIANTS}

    medians = median_of('samples_per_second')
    steady_medians = median_of('steady_samples_per_second')
    return {
        'num_workers': num_workers,
        'batch_size': batch_size,
        'median_samples_per_second': medians,
        'median_steady_samples_per_second': steady_medians,
        'median_first_batch_seconds': median_of('first_batch_seconds'),
        'ratio': medians['streaming'] / medians['plain'],
        'steady_ratio': steady_medians['streaming'] / steady_medians['plain'],
        'samples_per_epoch': {
            name: {key: epochs[name][-1][key] for key in ('samples', 'distinct_samples')} for name in VARIANTS
        },
        'check': check,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=512, help='number of synthetic images')
    parser.add_argument('--image-size', type=int, default=256, help='side of the square JPEGs, in pixels')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='DataLoader worker counts')
    parser.add_argument('--repeats', type=int, default=5, help='timed epochs per loader')
    parser.add_argument('--train-transform', action='store_true',
                        help="use OpenCLIP's training augmentation (random resized crop), not the evaluation transform")
    parser.add_argument('--quick', action='store_true', help='64 images, batch 16, 1 and 2 workers, 2 epochs')
    parser.add_argument('--out', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.repeats = 64, 16, 2

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        pairs = write_images(Path(folder, 'images'), args.images, args.image_size)
        mds_folder = os.path.join(folder, 'mds')
        write_image_text_mds(pairs, mds_folder)
        results = [
            measure(pairs, mds_folder, args.batch_size, workers, args.repeats, args.train_transform)
            for workers in args.workers
        ]
    load_after = os.getloadavg()

    transform = 'training' if args.train_transform else 'evaluation'
    print(f'{args.images} JPEGs of {args.image_size} px, {transform} transform to 224 px, batch {args.batch_size}, '
          f'median of {args.repeats} epochs, torch {torch.__version__}, '
          f'load average {load_before[0]:.2f} before and {load_after[0]:.2f} after')
    print('| workers | streaming samples/s | plain samples/s | streaming / plain | after the first batch: '
          'streaming / plain | streaming first batch s | plain first batch s |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for result in results:
        rates = result['median_samples_per_second']
        first = result['median_first_batch_seconds']
        print(f'| {result["num_workers"]} | {rates["streaming"]:.1f} | {rates["plain"]:.1f} | {result["ratio"]:.3f} | '
              f'{result["steady_ratio"]:.3f} | {first["streaming"]:.3f} | {first["plain"]:.3f} |')

    print()
    print('| workers | samples compared | max image difference | token mismatches |')
    print('| --- | --- | --- | --- |')
    for result in results:
        check = result['check']
        image_difference = 'n/a' if check['max_image_difference'] is None else f'{check["max_image_difference"]:.1e}'
        print(f'| {result["num_workers"]} | {check["samples_compared"]} | {image_difference} | '
              f'{check["token_mismatches"]} |')

    if args.out:
        write_summary(args.out, 'data_pipeline', (load_before[0], load_after[0]), results, images=args.images,
                      image_size=args.image_size, transform=transform, repeats=args.repeats)
    return results


if __name__ == '__main__':
    main()
