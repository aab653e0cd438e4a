"""Bad samples at read time: skipped, replaced, counted per reason and limited by max_bad_samples."""

import io
import logging
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import merge_index

from composer_clip.builders import build_trainer, load_config
from composer_clip.callbacks import BadSampleMonitor
from composer_clip.data import BAD_SAMPLE_REASONS, StreamingImageTextDataset, build_image_transform
from composer_clip.data.bad_samples import BadSampleCounts, decode_sample_image, exceeds_max_bad_samples

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures('destroy_process_group')


def png_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\x00')) + chunk(b'IEND', b'')


# Bad samples by position in the training shards, with the reason each must be counted under.
BAD_TRAIN_SAMPLES = {
    1: ('corrupt', b'\x89PNG\r\n\x1a\n' + b'\x00' * 64, 'image_undecodable'),
    3: ('truncated', png_bytes(3)[:60], 'image_undecodable'),
    6: ('empty image', b'', 'image_empty'),
    9: ('not an image', b'caption text, not pixels', 'image_undecodable'),
    12: ('over twice the pixel limit', png_header_only(20_000, 20_000), 'image_too_large'),
    13: ('over the pixel limit', png_header_only(10_000, 10_000), 'image_too_large'),
    17: ('empty caption', None, 'caption_empty'),
    20: ('missing caption', None, 'caption_missing'),
}
NUM_TRAIN_SAMPLES = 24
SHARD_SIZE = 8


def write_shards(folder: Path, num_samples: int, bad: dict, shard_size: int = SHARD_SIZE) -> None:
    """Write ``num_samples`` samples, ``shard_size`` per shard, with the bad ones at their positions.

    Each shard is written as its own partition folder ``part<kk>`` and the partitions' indexes
    are merged. The caption column is JSON so that a caption can be missing (None).
    """
    columns = {'image': 'bytes', 'caption': 'json'}
    for start in range(0, num_samples, shard_size):
        # Zero-padded names keep the merged index, which lists partitions by name, in sample order.
        with MDSWriter(out=str(folder / f'part{start // shard_size:02d}'), columns=columns) as writer:
            for index in range(start, min(start + shard_size, num_samples)):
                image, caption = png_bytes(index), f'sample {index}'
                if index in bad:
                    _, bad_image, reason = bad[index]
                    if reason.startswith('caption'):
                        caption = '  ' if reason == 'caption_empty' else None
                    else:
                        image = bad_image
                writer.write({'image': image, 'caption': caption})
    merge_index(str(folder), keep_local=True)


@pytest.fixture(scope='module')
def bad_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('bad_shards')
    write_shards(root / 'train', NUM_TRAIN_SAMPLES, BAD_TRAIN_SAMPLES)
    write_shards(root / 'val', 8, {2: ('corrupt', b'not an image', 'image_undecodable')})
    return root


def build_dataset(folder: Path) -> StreamingImageTextDataset:
    return StreamingImageTextDataset(
        local=str(folder),
        image_transforms=[build_image_transform({'size': 8}, False)],
        tokenizers=[lambda captions: [[len(caption)] for caption in captions]],
    )


def test_decode_sample_image_reasons():
    assert decode_sample_image(png_bytes(0)).mode == 'RGB'
    for index, (name, image, reason) in BAD_TRAIN_SAMPLES.items():
        if reason.startswith('caption'):
            continue
        with pytest.raises(ValueError) as error:
            decode_sample_image(image)
        assert error.value.reason == reason, name


@pytest.mark.parametrize('index', sorted(BAD_TRAIN_SAMPLES))
def test_dataset_replaces_bad_sample_within_shard(bad_shards, index):
    dataset = build_dataset(bad_shards / 'train')

    sample = dataset[index]

    # The replacement is the next good sample of the same shard, wrapping around at its end.
    shard_start = index - index % SHARD_SIZE
    candidates = [shard_start + (index - shard_start + step) % SHARD_SIZE for step in range(1, SHARD_SIZE)]
    expected = next(candidate for candidate in candidates if candidate not in BAD_TRAIN_SAMPLES)
    assert sample['sample_index'] == expected
    assert sample['texts'][0].tolist() == [len(f'sample {expected}')]
    [bad] = sample['bad_samples']
    assert bad.sample_index == index
    assert bad.reason == BAD_TRAIN_SAMPLES[index][2]
    assert bad.shard == str(bad_shards / 'train' / f'part{index // SHARD_SIZE:02d}' / 'shard.00000.mds')


def test_dataset_good_sample_has_no_bad_samples(bad_shards):
    sample = build_dataset(bad_shards / 'train')[0]

    assert sample['sample_index'] == 0
    assert sample['bad_samples'] == []


def test_dataset_all_bad_shard_names_shard(tmp_path):
    write_shards(tmp_path, 3, {index: ('empty image', b'', 'image_empty') for index in range(3)})
    dataset = build_dataset(tmp_path)

    with pytest.raises(ValueError, match=r'All 3 samples of shard .*shard\.00000\.mds are bad'):
        dataset[1]


def test_max_bad_samples_count_and_fraction():
    counts = BadSampleCounts()
    counts.add(50, {'image_empty': 1})

    assert not exceeds_max_bad_samples(counts, None)
    assert not exceeds_max_bad_samples(counts, 1)
    assert exceeds_max_bad_samples(counts, 0)
    # 1 bad in 50 read: a 1% limit allows 0.5 samples, less than one, so it is not checked yet.
    assert not exceeds_max_bad_samples(counts, 0.01)
    counts.add(50, {'caption_empty': 1})
    # 2 bad in 100 read.
    assert exceeds_max_bad_samples(counts, 0.01)
    assert not exceeds_max_bad_samples(counts, 0.02)


@pytest.mark.parametrize('value, error', [(-1, ValueError), (1.5, ValueError), (0.0, ValueError), ('5', TypeError),
                                          (True, TypeError)])
def test_bad_sample_monitor_rejects_invalid_limit(value, error):
    with pytest.raises(error, match='max_bad_samples'):
        BadSampleMonitor(max_bad_samples=value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def tiny_overrides(shards: Path, metrics_file: Path, *extra: str) -> list[str]:
    tower = '[{name: timm, model_name: resnet10t, image_size: 32, pretrained: false}]'
    return [
        f'model.vision_encoders={tower}',
        'model.text_encoder.context_length=8',
        'model.embed_dim=16',
        'loss.aggregation=mean',
        'loss.learnable_weights=false',
        f'train_loader.local={shards}/train',
        'train_loader.num_workers=0',
        f'eval_loader.local={shards}/val',
        'eval_loader.num_workers=0',
        'global_train_batch_size=8',
        'device_eval_batch_size=4',
        'max_duration=2ep',
        'eval_interval=1ep',
        'parallelism_config=null',
        'progress_bar=false',
        f'metrics_file={metrics_file}',
        'zero_shot=null',
        *extra,
    ]


def run_training(shards: Path, tmp_path: Path, *extra: str):
    metrics_file = tmp_path / 'metrics.txt'
    config = load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), tiny_overrides(shards, metrics_file, *extra))
    trainer = build_trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer, metrics_file


def test_training_counts_bad_samples_per_reason(bad_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='composer_clip.callbacks')

    trainer, metrics_file = run_training(bad_shards, tmp_path)

    [monitor] = [callback for callback in trainer.state.callbacks if isinstance(callback, BadSampleMonitor)]
    expected = {reason: 0 for reason in BAD_SAMPLE_REASONS}
    for _, _, reason in BAD_TRAIN_SAMPLES.values():
        expected[reason] += 2  # two epochs
    assert int(trainer.state.timestamp.batch) == 6
    assert dict(monitor.train_counts.by_reason) == {reason: n for reason, n in expected.items() if n}
    assert monitor.train_counts.samples_read == 2 * NUM_TRAIN_SAMPLES
    assert dict(monitor.eval_counts.by_reason) == {'image_undecodable': 1}

    metrics = metrics_file.read_text()
    assert f'bad_samples/train/total: {2 * len(BAD_TRAIN_SAMPLES)}' in metrics
    assert f'bad_samples/train/total: {len(BAD_TRAIN_SAMPLES)}' in metrics
    assert 'bad_samples/train/image_too_large: 4' in metrics
    assert 'bad_samples/eval/image_undecodable: 1' in metrics
    epoch_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith('Epoch ')]
    assert epoch_lines[0].startswith(f'Epoch 1: skipped {len(BAD_TRAIN_SAMPLES)} bad samples of 24 read')
    assert epoch_lines[1].endswith(f'; {2 * len(BAD_TRAIN_SAMPLES)} in the run so far')
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith('Skipped bad')]
    assert any('Skipped bad sample 12 of' in line and '(image_too_large)' in line for line in skipped)


def test_training_stops_over_max_bad_samples(bad_shards, tmp_path):
    with pytest.raises(RuntimeError) as error:
        run_training(bad_shards, tmp_path, 'train_loader.max_bad_samples=2', 'train_loader.shuffle=false')

    # Unshuffled, the first batch contains samples 0-7 (bad: 1, 3, 6) and the limit of 2 is
    # exceeded there.
    message = str(error.value)
    assert message.startswith('3 bad samples of 8 read during training exceed max_bad_samples=2')
    assert 'The latest on this rank is sample 6 of shard' in message
    assert 'part00/shard.00000.mds (image_empty' in message


def test_one_rank_failure_ends_job(tmp_path):
    """A rank that raises ends the 2-process job long before the collective timeout, with its error shown."""
    # One sample per shard, so the all-bad shard of sample 9 fails on one rank only.
    write_shards(tmp_path / 'train', 32, {9: BAD_TRAIN_SAMPLES[6]}, shard_size=1)
    write_shards(tmp_path / 'val', 8, {})
    overrides = tiny_overrides(tmp_path, tmp_path / 'metrics.txt', 'max_duration=1ep',
                               'train_loader.shuffle=false', 'dist_timeout=600')
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
               str(REPO_ROOT / 'train.py'), str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), *overrides]

    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Start-up takes about 20 s on 2 cores; the collective timeout is 600 s.
    assert elapsed < 150, f'the job took {elapsed:.0f} s to exit'
    failing = [line for line in output.splitlines() if 'are bad, so sample 9 has no replacement' in line]
    assert failing, output[-4000:]
    assert 'part09/shard.00000.mds' in failing[0]
