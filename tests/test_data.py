"""Tests of composer_clip.data: MDS writing, RGB conversion, per-tower transforms, dataset, loader, converters, demo."""

import csv
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from streaming import MDSWriter, StreamingDataset
from torchvision.transforms import InterpolationMode

from composer_clip.data import (
    StreamingImageTextDataset,
    build_image_text_dataloader,
    build_image_transform,
    collate_image_text,
    convert_to_rgb,
    decode_image,
    find_image_caption_files,
    normalize_preprocess_cfg,
    write_image_text_mds,
)
from composer_clip.data import demo

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two vision towers that differ in size, normalisation, interpolation and resize mode.
TOWER_A_CFG = {
    'size': 32,
    'mean': (0.48145466, 0.4578275, 0.40821073),
    'std': (0.26862954, 0.26130258, 0.27577711),
    'interpolation': 'bicubic',
    'resize_mode': 'shortest',
    'fill_color': 0,
}
TOWER_B_CFG = {
    'size': (40, 24),
    'mean': (0.5, 0.5, 0.5),
    'std': (0.5, 0.5, 0.5),
    'interpolation': 'bilinear',
    'resize_mode': 'squash',
    'fill_color': 0,
}
TOWER_C_CFG = {
    'size': (36, 28),
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'interpolation': 'bicubic',
    'resize_mode': 'longest',
    'fill_color': 128,
}


class ByteTokenizer:
    """UTF-8 bytes shifted by one, zero-padded or truncated to ``context_length``."""

    def __init__(self, context_length: int = 16) -> None:
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        token_ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            values = [byte + 1 for byte in text.encode('utf-8')][:self.context_length]
            token_ids[row, :len(values)] = torch.tensor(values, dtype=torch.long)
        return token_ids


# Independent reference computations.

def manual_rgb(data: bytes) -> np.ndarray:
    """Decode with Pillow and composite any transparency on white with numpy, `(H, W, 3)` uint8."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode == 'RGB':
            return np.asarray(image).copy()
        rgba = np.asarray(image.convert('RGBA')).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def manual_transform(rgb: np.ndarray, cfg: dict) -> torch.Tensor:
    """Resize, crop or pad, scale to [0, 1] and normalise with the tower's settings, `(3, H, W)`."""
    image = Image.fromarray(rgb)
    interpolation = InterpolationMode.BICUBIC if cfg['interpolation'] == 'bicubic' else InterpolationMode.BILINEAR
    size = cfg['size']
    height, width = (size, size) if isinstance(size, int) else size

    if cfg['resize_mode'] == 'squash':
        image = TF.resize(image, [height, width], interpolation)
    elif cfg['resize_mode'] == 'shortest':
        assert height == width, 'the reference handles square shortest-edge resizing only'
        image = TF.resize(image, height, interpolation)
        image = TF.center_crop(image, [height, width])
    else:
        ratio = max(image.height / height, image.width / width)
        resized = TF.resize(image, [round(image.height / ratio), round(image.width / ratio)], interpolation)
        image = Image.new('RGB', (width, height), (cfg['fill_color'],) * 3)
        image.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))

    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(cfg['mean']).view(3, 1, 1)
    std = torch.tensor(cfg['std']).view(3, 1, 1)
    return (pixels - mean) / std


# Test images.

def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 255, height)[:, None]
    cols = np.linspace(0, 255, width)[None, :]
    base = np.stack([rows + 0 * cols, cols + 0 * rows, (rows + cols) / 2], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def synthetic_samples() -> list[tuple[bytes, str]]:
    """JPEG RGB, PNG RGBA with varying alpha, PNG greyscale and PNG palette images with captions."""
    rgba = np.concatenate([_pattern(50, 70, 2), np.tile(np.linspace(0, 255, 70, dtype=np.uint8), (50, 1))[..., None]],
                          axis=-1)
    palette = Image.fromarray(_pattern(45, 45, 4)).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    return [
        (encode(Image.fromarray(_pattern(60, 80, 1)), 'JPEG', quality=90), 'A wide JPEG photo.'),
        (encode(Image.fromarray(rgba), 'PNG'), 'A PNG that fades from transparent to opaque.'),
        (encode(Image.fromarray(_pattern(64, 48, 3)[..., 0]), 'PNG'), 'A tall greyscale PNG.'),
        (encode(palette, 'PNG'), 'A palette PNG.'),
        (encode(Image.fromarray(_pattern(33, 90, 5)), 'JPEG', quality=75), 'A very wide JPEG, résumé café ☕.'),
    ]


def stamp_samples(stamps_dir: Path, count: int) -> list[tuple[bytes, str]]:
    listing = demo.list_stamps(stamps_dir)
    return [(stamp.image_path.read_bytes(), stamp.caption) for stamp in listing.stamps[:count]]


def read_mds(folder: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(folder))
    return [dataset[index] for index in range(dataset.size)]


def load_script(name: str):
    path = REPO_ROOT / 'scripts' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'script_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def clip_tokenizer():
    return open_clip.get_tokenizer('ViT-B-32')


@pytest.fixture(scope='module')
def mixed_samples(tuxpaint_stamps) -> list[tuple[bytes, str]]:
    return synthetic_samples() + stamp_samples(tuxpaint_stamps, 4)


@pytest.fixture(scope='module')
def mixed_shards(tmp_path_factory, mixed_samples) -> Path:
    out = tmp_path_factory.mktemp('mixed') / 'mds'
    counts = write_image_text_mds(mixed_samples, str(out), size_limit=150_000)
    assert counts.written == len(mixed_samples)
    return out


# RGB conversion and transforms.

def test_convert_to_rgb_composites_alpha_on_white():
    pixels = np.array([[[10, 200, 30, 0], [10, 200, 30, 255], [10, 200, 30, 128], [250, 0, 100, 1]]], dtype=np.uint8)
    converted = np.asarray(convert_to_rgb(Image.fromarray(pixels)))
    alpha = pixels[..., 3:].astype(np.float64) / 255.0
    expected = np.rint(pixels[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    assert converted.dtype == np.uint8
    assert converted.tolist() == expected.tolist()
    assert converted[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGB'])
def test_convert_to_rgb_modes(mode):
    rgba = np.concatenate([_pattern(8, 8, 0), np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    rgba[0, 0, 3] = 0
    source = Image.fromarray(rgba).convert(mode)
    converted = convert_to_rgb(source)
    assert converted.mode == 'RGB'
    expected_alpha = 0 if mode == 'LA' else 255
    expected_first = [255, 255, 255] if expected_alpha == 0 else list(source.convert('RGB').getpixel((0, 0)))
    assert list(converted.getpixel((0, 0))) == expected_first


def test_convert_to_rgb_palette_transparency():
    palette = Image.new('P', (2, 1))
    palette.putpalette([200, 10, 10, 0, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    decoded = Image.open(io.BytesIO(encode(palette, 'PNG', transparency=1)))
    converted = convert_to_rgb(decoded)
    assert list(converted.getpixel((0, 0))) == [200, 10, 10]
    assert list(converted.getpixel((1, 0))) == [255, 255, 255]


def test_convert_to_rgb_sixteen_bit_grey():
    values = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    decoded = Image.open(io.BytesIO(encode(Image.fromarray(values), 'PNG')))
    converted = np.asarray(convert_to_rgb(decoded))
    assert converted[0, :, 0].tolist() == [0, 1, 255, round(1000 / 257)]
    assert converted[0, :, 2].tolist() == converted[0, :, 0].tolist()


def _composite_on_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(value.astype(np.float64) * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


def _palette_with_transparency(rng) -> tuple[Image.Image, np.ndarray]:
    indices = rng.integers(0, 4, (6, 6), dtype=np.uint8)
    colours = np.array([[200, 10, 10], [0, 0, 0], [10, 200, 30], [1, 2, 3]], dtype=np.uint8)
    palette = Image.frombytes('P', (6, 6), indices.tobytes())
    palette.putpalette(colours.flatten().tolist() + [0] * (768 - colours.size))
    expected = colours[indices]
    expected[indices == 1] = 255
    return palette, expected


def _encoded_image_and_expected_rgb(mode: str) -> tuple[bytes, np.ndarray]:
    """Encode a random image of ``mode`` losslessly and compute its RGB version independently."""
    rng = np.random.default_rng(len(mode))
    if mode == 'L':
        grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
        return encode(Image.fromarray(grey), 'PNG'), np.repeat(grey[..., None], 3, axis=-1)
    if mode == 'LA':
        grey_alpha = rng.integers(0, 256, (6, 6, 2), dtype=np.uint8)
        expected = _composite_on_white(np.repeat(grey_alpha[..., :1], 3, axis=-1), grey_alpha[..., 1])
        return encode(Image.fromarray(grey_alpha), 'PNG'), expected
    if mode == 'P':
        palette, expected = _palette_with_transparency(rng)
        return encode(palette, 'PNG', transparency=1), expected
    if mode == 'RGBA':
        rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
        return encode(Image.fromarray(rgba), 'PNG'), _composite_on_white(rgba[..., :3], rgba[..., 3])
    if mode == 'CMYK':
        cmyk = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
        # Pillow 11 converts CMYK without a colour profile: each channel is
        # (255 - ink) * (255 - black) / 255, rounded.
        ink, black = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
        expected = np.rint((255.0 - ink) * (255.0 - black) / 255.0).astype(np.uint8)
        return encode(Image.frombytes('CMYK', (6, 6), cmyk.tobytes()), 'TIFF'), expected
    if mode == 'I;16':
        values = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
        grey = np.rint(values / 257.0).astype(np.uint8)
        return encode(Image.fromarray(values), 'PNG'), np.repeat(grey[..., None], 3, axis=-1)
    raise ValueError(mode)


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGBA', 'CMYK', 'I;16'])
def test_decode_image_converts_mode_to_rgb(mode):
    data, expected = _encoded_image_and_expected_rgb(mode)

    first = np.asarray(decode_image(data))
    second = np.asarray(decode_image(data))

    assert Image.open(io.BytesIO(data)).mode == mode
    assert first.dtype == np.uint8
    assert first.shape == (6, 6, 3)
    assert first.tolist() == expected.tolist()
    assert second.tolist() == first.tolist()


@pytest.mark.parametrize('cfg', [TOWER_A_CFG, TOWER_B_CFG, TOWER_C_CFG], ids=['shortest', 'squash', 'longest'])
def test_build_image_transform_matches_manual(cfg, mixed_samples):
    transform = build_image_transform(cfg, is_train=False)
    for data, _ in mixed_samples:
        expected = manual_transform(manual_rgb(data), cfg)
        with Image.open(io.BytesIO(data)) as image:
            actual = transform(image)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_build_image_transform_train_shape_and_range():
    transform = build_image_transform(TOWER_B_CFG, is_train=True)
    torch.manual_seed(0)
    image = Image.fromarray(_pattern(50, 50, 9))
    output = transform(image)
    assert output.shape == (3, 40, 24)
    assert transform.cache_key is None
    assert float(output.min()) >= -1.0 - 1e-6
    assert float(output.max()) <= 1.0 + 1e-6


def test_image_transform_pickles():
    transform = build_image_transform(TOWER_C_CFG, is_train=False)
    restored = pickle.loads(pickle.dumps(transform))
    image = Image.fromarray(_pattern(20, 30, 6))
    torch.testing.assert_close(restored(image), transform(image), rtol=0, atol=0)
    assert restored.cache_key == transform.cache_key


def test_normalize_preprocess_cfg_defaults_and_scalars():
    cfg = normalize_preprocess_cfg({'size': [64, 32], 'mean': 0.5, 'std': 0.25})
    assert cfg.size == (64, 32)
    assert cfg.mean == (0.5, 0.5, 0.5)
    assert cfg.std == (0.25, 0.25, 0.25)
    assert cfg.interpolation == 'bicubic'
    assert cfg.resize_mode == 'shortest'


@pytest.mark.parametrize('bad, message', [
    ({'size': 32, 'crop': True}, 'Unknown preprocess_cfg keys'),
    ({'interpolation': 'nearest'}, "interpolation='nearest'"),
    ({'resize_mode': 'crop'}, "resize_mode='crop'"),
    ({'size': 0}, 'size=0'),
    ({'mean': (0.5, 0.5)}, 'mean=(0.5, 0.5)'),
    ({'std': (0.5, 0.0, 0.5)}, 'must be positive'),
    ({'mode': 'L'}, "mode='L'"),
])
def test_normalize_preprocess_cfg_rejects_invalid(bad, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        normalize_preprocess_cfg(bad)


# MDS writing.

def test_write_image_text_mds_skips_bad_samples(tmp_path, mixed_samples):
    good_jpeg, good_png = mixed_samples[0], mixed_samples[1]
    image_file = tmp_path / 'on_disk.png'
    image_file.write_bytes(mixed_samples[2][0])
    truncated_png = good_png[0][:len(good_png[0]) // 2]
    samples = [
        good_jpeg,
        (b'not an image at all', 'corrupt bytes'),
        {'image': good_png[0], 'caption': '  padded caption \n'},
        (truncated_png, 'truncated PNG'),
        (tmp_path / 'missing.png', 'missing file'),
        (image_file, 'read from a path'),
        (good_jpeg[0], None),
        (good_jpeg[0], '   '),
        (tmp_path, 'a folder, not a file'),
    ]
    skipped_positions = []

    counts = write_image_text_mds(
        iter(samples), str(tmp_path / 'mds'),
        on_skip=lambda position, reason: skipped_positions.append((position, reason)),
    )

    assert counts.written == 3
    assert counts.skipped == 6
    assert counts.skipped_by_reason == {
        'caption_empty': 1,
        'caption_missing': 1,
        'image_not_found': 1,
        'image_undecodable': 2,
        'image_unreadable': 1,
    }
    assert skipped_positions == [
        (1, 'image_undecodable'), (3, 'image_undecodable'), (4, 'image_not_found'),
        (6, 'caption_missing'), (7, 'caption_empty'), (8, 'image_unreadable'),
    ]
    rows = read_mds(tmp_path / 'mds')
    assert [row['caption'] for row in rows] == [good_jpeg[1], 'padded caption', 'read from a path']
    assert rows[0]['image'] == good_jpeg[0]
    assert rows[1]['image'] == good_png[0]
    assert rows[2]['image'] == mixed_samples[2][0]


@pytest.mark.parametrize('sample', [
    ('bytes as str', 'caption'),
    (b'x', 42),
    ({'img': b'x', 'caption': 'c'}),
    ([b'x', 'caption']),
])
def test_write_image_text_mds_rejects_wrong_types(tmp_path, sample):
    with pytest.raises(TypeError, match='Sample 0'):
        write_image_text_mds([sample], str(tmp_path / 'mds'))


def test_write_image_text_mds_refuses_non_empty_out(tmp_path, mixed_samples):
    out = tmp_path / 'mds'
    write_image_text_mds(mixed_samples[:1], str(out))
    with pytest.raises(FileExistsError):
        write_image_text_mds(mixed_samples[:1], str(out))
    counts = write_image_text_mds(mixed_samples[:2], str(out), exist_ok=True)
    assert counts.written == 2
    assert len(read_mds(out)) == 2


# Dataset and dataloader.

def test_dataloader_two_towers_match_manual(mixed_shards, mixed_samples, clip_tokenizer):
    byte_tokenizer = ByteTokenizer(16)
    loader = build_image_text_dataloader(
        local=str(mixed_shards),
        batch_size=4,
        shuffle=False,
        drop_last=False,
        image_transforms=[build_image_transform(TOWER_A_CFG, False), build_image_transform(TOWER_B_CFG, False)],
        tokenizers=[clip_tokenizer, byte_tokenizer],
    )
    batches = list(loader)

    assert [len(batch['sample_index']) for batch in batches] == [4, 4, 1]
    indices = torch.cat([batch['sample_index'] for batch in batches])
    assert indices.dtype == torch.long
    assert indices.tolist() == list(range(len(mixed_samples)))

    for batch in batches:
        assert batch['images'][0].shape[1:] == (3, 32, 32)
        assert batch['images'][1].shape[1:] == (3, 40, 24)
        assert batch['texts'][0].shape[1:] == (77,)
        assert batch['texts'][1].shape[1:] == (16,)
        for row, index in enumerate(batch['sample_index'].tolist()):
            data, caption = mixed_samples[index]
            rgb = manual_rgb(data)
            torch.testing.assert_close(batch['images'][0][row], manual_transform(rgb, TOWER_A_CFG), rtol=0, atol=1e-5)
            torch.testing.assert_close(batch['images'][1][row], manual_transform(rgb, TOWER_B_CFG), rtol=0, atol=1e-5)
            assert batch['texts'][0][row].tolist() == clip_tokenizer([caption])[0].tolist()
            expected_bytes = [byte + 1 for byte in caption.encode('utf-8')][:16]
            assert batch['texts'][1][row].tolist() == expected_bytes + [0] * (16 - len(expected_bytes))


def test_dataset_shares_equal_eval_transforms(mixed_shards):
    tokenizer = ByteTokenizer(8)
    train_a = build_image_transform(TOWER_A_CFG, is_train=True)
    train_b = build_image_transform(TOWER_A_CFG, is_train=True)
    dataset = StreamingImageTextDataset(
        local=str(mixed_shards),
        image_transforms=[
            build_image_transform(TOWER_A_CFG, False),
            build_image_transform(dict(TOWER_A_CFG), False),
            train_a,
            train_a,
            train_b,
        ],
        tokenizers=[tokenizer, tokenizer],
    )
    torch.manual_seed(0)
    sample = dataset[1]
    images = sample['images']

    assert sample['sample_index'] == 1
    assert images[0] is images[1]
    assert images[2] is images[3]
    assert images[2] is not images[4]
    assert not torch.equal(images[2], images[4])
    assert sample['texts'][0] is sample['texts'][1]

    batch = collate_image_text([dataset[0], dataset[1]])
    assert batch['images'][0] is batch['images'][1]
    assert batch['images'][0] is not batch['images'][4]
    assert torch.equal(batch['images'][1][1], images[1])


def test_dataset_augmentation_depends_only_on_sample(mixed_shards):
    dataset = StreamingImageTextDataset(
        local=str(mixed_shards),
        image_transforms=[build_image_transform(TOWER_A_CFG, is_train=True)],
        tokenizers=[ByteTokenizer(8)],
    )

    torch.manual_seed(0)
    first = dataset[2]['images'][0]
    other = dataset[3]['images'][0]
    torch.manual_seed(123)
    dataset[1]
    again = dataset[2]['images'][0]

    # The global generator's state and the order of reads do not change a sample's crop.
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dataset_negative_index_and_slice(mixed_shards):
    dataset = StreamingImageTextDataset(
        local=str(mixed_shards),
        image_transforms=[build_image_transform(TOWER_A_CFG, False)],
        tokenizers=[ByteTokenizer(8)],
    )
    assert dataset[-1]['sample_index'] == dataset.size - 1
    assert [sample['sample_index'] for sample in dataset[2:4]] == [2, 3]


def test_dataset_missing_column_lists_found(tmp_path):
    with MDSWriter(out=str(tmp_path / 'mds'), columns={'img': 'bytes', 'txt': 'str'}) as writer:
        writer.write({'img': encode(Image.fromarray(_pattern(8, 8, 0)), 'PNG'), 'txt': 'a caption'})

    with pytest.raises(ValueError, match=r"no column\(s\) \['image', 'caption'\]; it has columns \['img', 'txt'\]"):
        StreamingImageTextDataset(local=str(tmp_path / 'mds'), image_transforms=[lambda image: image],
                                  tokenizers=[ByteTokenizer()])

    dataset = StreamingImageTextDataset(local=str(tmp_path / 'mds'), image_key='img', caption_key='txt',
                                        image_transforms=[build_image_transform({'size': 8}, False)],
                                        tokenizers=[ByteTokenizer(4)])
    assert dataset[0]['texts'][0].tolist() == [ord('a') + 1, ord(' ') + 1, ord('c') + 1, ord('a') + 1]


def test_dataset_replaces_corrupt_image(tmp_path):
    with MDSWriter(out=str(tmp_path / 'mds'), columns={'image': 'bytes', 'caption': 'str'}) as writer:
        writer.write({'image': encode(Image.fromarray(_pattern(8, 8, 0)), 'PNG'), 'caption': 'good'})
        writer.write({'image': b'garbage', 'caption': 'bad'})
    dataset = StreamingImageTextDataset(local=str(tmp_path / 'mds'),
                                        image_transforms=[build_image_transform({'size': 8}, False)],
                                        tokenizers=[ByteTokenizer(4)])

    sample = dataset[1]

    assert sample['sample_index'] == 0
    [bad] = sample['bad_samples']
    assert (bad.sample_index, bad.reason) == (1, 'image_undecodable')
    assert 'the image does not decode (UnidentifiedImageError' in bad.message


@pytest.mark.parametrize('kwargs, error, message', [
    ({'image_transforms': build_image_transform({'size': 8}, False)}, TypeError, 'one callable per vision tower'),
    ({'image_transforms': []}, ValueError, 'image_transforms is empty'),
    ({'tokenizers': ['not callable']}, TypeError, r'tokenizers\[0\] is a str'),
])
def test_dataset_rejects_bad_tower_arguments(mixed_shards, kwargs, error, message):
    arguments = {
        'local': str(mixed_shards),
        'image_transforms': [build_image_transform({'size': 8}, False)],
        'tokenizers': [ByteTokenizer()],
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        StreamingImageTextDataset(**arguments)


def test_collate_image_text_rejects_mismatched_shapes():
    samples = [
        {'images': [torch.zeros(3, 8, 8)], 'texts': [torch.zeros(4, dtype=torch.long)], 'sample_index': 0},
        {'images': [torch.zeros(3, 8, 9)], 'texts': [torch.zeros(4, dtype=torch.long)], 'sample_index': 1},
    ]
    with pytest.raises(ValueError, match='vision inputs of tower 0 have different shapes'):
        collate_image_text(samples)


def test_dataloader_one_worker_shuffled(mixed_shards, mixed_samples):
    transform = build_image_transform(TOWER_B_CFG, False)
    loader = build_image_text_dataloader(
        local=str(mixed_shards),
        batch_size=3,
        shuffle=True,
        shuffle_seed=7,
        drop_last=True,
        num_workers=1,
        image_transforms=[transform],
        tokenizers=[ByteTokenizer(16)],
    )
    assert loader.dataset.batch_size == 3
    assert loader.persistent_workers

    batches = list(loader)
    indices = torch.cat([batch['sample_index'] for batch in batches]).tolist()

    assert len(batches) == len(mixed_samples) // 3
    assert len(set(indices)) == len(indices)
    assert indices != sorted(indices)
    for batch in batches:
        for row, index in enumerate(batch['sample_index'].tolist()):
            expected = manual_transform(manual_rgb(mixed_samples[index][0]), TOWER_B_CFG)
            torch.testing.assert_close(batch['images'][0][row], expected, rtol=0, atol=1e-5)


def test_dataloader_resumes_mid_epoch(mixed_shards, mixed_samples):
    def build_loader():
        return build_image_text_dataloader(local=str(mixed_shards), batch_size=3, shuffle=True, shuffle_seed=3,
                                           drop_last=False, image_transforms=[build_image_transform({'size': 8}, False)],
                                           tokenizers=[ByteTokenizer(4)])

    full_order = torch.cat([batch['sample_index'] for batch in build_loader()]).tolist()
    interrupted = build_loader()
    iterator = iter(interrupted)
    seen = torch.cat([next(iterator)['sample_index'], next(iterator)['sample_index']]).tolist()
    state = interrupted.dataset.state_dict(num_samples=len(seen), from_beginning=True)

    resumed = build_loader()
    resumed.dataset.load_state_dict(state)
    rest = torch.cat([batch['sample_index'] for batch in resumed]).tolist()

    assert sorted(full_order) == list(range(len(mixed_samples)))
    assert seen == full_order[:6]
    assert rest == full_order[6:]


# Object store.

@pytest.fixture()
def s3_bucket(s3_server):
    """Return the name of a bucket on the S3 server of the `s3_server` fixture."""
    boto3 = pytest.importorskip('boto3')
    boto3.client('s3', endpoint_url=s3_server).create_bucket(Bucket='clip-data')
    return 'clip-data'


def test_write_and_stream_from_s3(tmp_path, s3_bucket, mixed_samples):
    remote = f's3://{s3_bucket}/mixed/train'
    counts = write_image_text_mds(mixed_samples[:5], remote, size_limit=60_000)
    assert counts.written == 5

    transforms = [build_image_transform(TOWER_C_CFG, False)]
    loader = build_image_text_dataloader(remote=remote, local=str(tmp_path / 'cache'), batch_size=5, shuffle=False,
                                         drop_last=False, image_transforms=transforms, tokenizers=[ByteTokenizer()])
    batch = next(iter(loader))

    assert batch['sample_index'].tolist() == [0, 1, 2, 3, 4]
    for row, (data, _) in enumerate(mixed_samples[:5]):
        expected = manual_transform(manual_rgb(data), TOWER_C_CFG)
        torch.testing.assert_close(batch['images'][0][row], expected, rtol=0, atol=1e-5)
    assert sorted(path.name for path in (tmp_path / 'cache').iterdir()) == ['index.json', 'shard.00000.mds']


# Converters.

def _write_caption_folder(folder: Path, samples: list[tuple[bytes, str]]) -> None:
    (folder / 'sub' / 'deeper').mkdir(parents=True)
    (folder / 'a.jpg').write_bytes(samples[0][0])
    (folder / 'a.txt').write_text(f'\n   \n{samples[0][1]}\nsecond line is ignored\n', encoding='utf-8')
    (folder / 'sub' / 'b.PNG').write_bytes(samples[1][0])
    (folder / 'sub' / 'b.txt').write_text(samples[1][1], encoding='utf-8')
    (folder / 'sub' / 'deeper' / 'c.png').write_bytes(samples[2][0])
    (folder / 'sub' / 'deeper' / 'c.txt').write_bytes(b'\xef\xbb\xbf' + samples[2][1].encode('utf-8'))
    (folder / 'no_caption.png').write_bytes(samples[3][0])
    (folder / 'no_image.txt').write_text('orphan caption', encoding='utf-8')
    (folder / 'empty.png').write_bytes(samples[3][0])
    (folder / 'empty.txt').write_text('\n\n', encoding='utf-8')
    (folder / 'corrupt.webp').write_bytes(b'RIFF0000WEBPnonsense')
    (folder / 'corrupt.txt').write_text('a corrupt image', encoding='utf-8')
    (folder / 'latin1.png').write_bytes(samples[4][0])
    (folder / 'latin1.txt').write_bytes('café'.encode('latin-1'))


def test_find_image_caption_files_pairs(tmp_path, mixed_samples):
    _write_caption_folder(tmp_path, mixed_samples)
    files = find_image_caption_files(tmp_path)
    relative = lambda paths: [path.relative_to(tmp_path).as_posix() for path in paths]  # noqa: E731

    assert relative(image for image, _ in files.pairs) == [
        'a.jpg', 'corrupt.webp', 'empty.png', 'latin1.png', 'sub/b.PNG', 'sub/deeper/c.png']
    assert relative(caption for _, caption in files.pairs) == [
        'a.txt', 'corrupt.txt', 'empty.txt', 'latin1.txt', 'sub/b.txt', 'sub/deeper/c.txt']
    assert relative(files.images_without_caption) == ['no_caption.png']
    assert relative(files.captions_without_image) == ['no_image.txt']


def test_convert_folder_script_runs(tmp_path, mixed_samples):
    folder = tmp_path / 'images'
    _write_caption_folder(folder, mixed_samples)
    out = tmp_path / 'mds'
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))

    result = subprocess.run(
        [sys.executable, 'scripts/convert_folder_to_mds.py', str(folder), '--out', str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )

    assert result.returncode == 0, result.stderr
    rows = read_mds(out)
    assert [row['caption'] for row in rows] == [mixed_samples[0][1], mixed_samples[1][1], mixed_samples[2][1]]
    assert [row['image'] for row in rows] == [mixed_samples[0][0], mixed_samples[1][0], mixed_samples[2][0]]
    assert '1 images without a caption file' in result.stderr
    assert '1 caption files without an image' in result.stderr
    assert "'caption_empty': 1" in result.stderr
    assert "'caption_missing': 1" in result.stderr
    assert "'image_undecodable': 1" in result.stderr


def test_convert_csv_script_resolves_paths(tmp_path, mixed_samples):
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'one.jpg').write_bytes(mixed_samples[0][0])
    (images / 'two.png').write_bytes(mixed_samples[1][0])
    absolute = tmp_path / 'elsewhere.png'
    absolute.write_bytes(mixed_samples[2][0])
    table = tmp_path / 'pairs.csv'
    with open(table, 'w', newline='', encoding='utf-8') as file:
        writer = csv.writer(file)
        writer.writerow(['caption', 'path', 'extra'])
        writer.writerow(['First, with a comma', 'images/one.jpg', 'x'])
        writer.writerow(['Missing file', 'images/missing.jpg', 'x'])
        writer.writerow(['Second', 'images/two.png', 'x'])
        writer.writerow(['Absolute path', str(absolute), 'x'])
    script = load_script('convert_csv_to_mds')

    status = script.main([str(table), '--out', str(tmp_path / 'mds'), '--image-column', 'path',
                          '--caption-column', 'caption'])

    assert status == 0
    rows = read_mds(tmp_path / 'mds')
    assert [row['caption'] for row in rows] == ['First, with a comma', 'Second', 'Absolute path']
    assert [row['image'] for row in rows] == [mixed_samples[0][0], mixed_samples[1][0], mixed_samples[2][0]]

    tsv = tmp_path / 'pairs.tsv'
    tsv.write_text('filepath\ttitle\none.jpg\tFrom a TSV\n', encoding='utf-8')
    status = script.main([str(tsv), '--out', str(tmp_path / 'mds_tsv'), '--delimiter', 'tab',
                          '--image-root', str(images)])
    assert status == 0
    assert [row['caption'] for row in read_mds(tmp_path / 'mds_tsv')] == ['From a TSV']

    with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'title'\]; its columns are"):
        script.main([str(table), '--out', str(tmp_path / 'mds_bad')])


@pytest.mark.parametrize('name', ['convert_csv_to_mds', 'convert_folder_to_mds', 'prepare_demo_data'])
def test_script_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(['--help'])
    assert exit_info.value.code == 0
    assert '--out' in capsys.readouterr().out


# Demo data set.

def test_demo_split_deterministic_and_disjoint(tuxpaint_stamps):
    listing = demo.list_stamps(tuxpaint_stamps)
    again = demo.list_stamps(tuxpaint_stamps)
    train, val = demo.split_stamps(listing.stamps)
    train_again, val_again = demo.split_stamps(again.stamps)
    train_paths = {stamp.relative_path for stamp in train}
    val_paths = {stamp.relative_path for stamp in val}

    assert len(listing.stamps) > 500
    assert [stamp.relative_path for stamp in train_again] == [stamp.relative_path for stamp in train]
    assert [stamp.relative_path for stamp in val_again] == [stamp.relative_path for stamp in val]
    assert not train_paths & val_paths
    assert len(train_paths | val_paths) == len(listing.stamps)
    assert 0.05 < len(val) / len(listing.stamps) < 0.15
    for stamp in listing.stamps:
        digest = hashlib.sha256(stamp.relative_path.encode('utf-8')).hexdigest()
        assert (stamp.relative_path in val_paths) == (int(digest[:16], 16) % 100 < 10)

    # The split of a subset is the subset of the split, because it depends on the path only.
    subset = listing.stamps[::7]
    _, val_subset = demo.split_stamps(subset)
    assert {stamp.relative_path for stamp in val_subset} == val_paths & {stamp.relative_path for stamp in subset}


def test_demo_stamps_have_english_captions(tuxpaint_stamps):
    listing = demo.list_stamps(tuxpaint_stamps)
    categories = {stamp.category for stamp in listing.stamps}
    assert {'animals', 'food', 'vehicles'} <= categories
    for stamp in listing.stamps:
        assert stamp.caption
        assert '.utf8=' not in stamp.caption
        assert stamp.relative_path.startswith(stamp.category + '/')
        assert stamp.image_path.suffix == '.png'


def test_read_english_caption_skips_translations(tmp_path):
    english = tmp_path / 'english.txt'
    english.write_text('\nA red apple.\nfr.utf8=Une pomme rouge.\n', encoding='utf-8')
    translated = tmp_path / 'translated.txt'
    translated.write_text('ca@valencia.utf8=Una poma.\nfr.utf8=Une pomme.\n', encoding='utf-8')
    assert demo.read_english_caption(english) == 'A red apple.'
    assert demo.read_english_caption(translated) is None


def _copy_stamp(source_root: Path, target_root: Path, relative: str) -> None:
    for suffix in ('.png', '.txt'):
        source = (source_root / relative).with_suffix(suffix)
        if source.exists():
            target = (target_root / relative).with_suffix(suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def test_prepare_demo_data_small_and_idempotent(tmp_path, tuxpaint_stamps):
    listing = demo.list_stamps(tuxpaint_stamps)
    chosen = [stamp for stamp in listing.stamps if stamp.category in ('food', 'vehicles', 'space')]
    stamps_dir = tmp_path / 'stamps'
    for stamp in chosen:
        _copy_stamp(tuxpaint_stamps, stamps_dir, stamp.relative_path)
    (stamps_dir / 'food' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
    (stamps_dir / 'food' / 'broken.txt').write_text('A broken stamp.\n', encoding='utf-8')
    (stamps_dir / 'space' / 'translated_only.png').write_bytes(chosen[0].image_path.read_bytes())
    (stamps_dir / 'space' / 'translated_only.txt').write_text('fr.utf8=Seulement en français\n', encoding='utf-8')
    (stamps_dir / 'space' / 'uncaptioned_mirror.png').write_bytes(chosen[0].image_path.read_bytes())
    (stamps_dir / 'space' / 'vector_only.txt').write_text('An SVG-only stamp.\n', encoding='utf-8')
    out = tmp_path / 'demo'
    script = load_script('prepare_demo_data')

    assert script.main(['--out', str(out), '--stamps-dir', str(stamps_dir)]) == 0
    (out / 'train' / 'stale.mds').write_bytes(b'left over from an earlier run')
    first_train = (out / 'train' / 'shard.00000.mds').read_bytes()
    result = demo.prepare_demo_dataset(out, stamps_dir=stamps_dir)

    assert not (out / 'train' / 'stale.mds').exists()
    assert (out / 'train' / 'shard.00000.mds').read_bytes() == first_train
    assert result.skipped_by_reason == {
        'caption_file_without_png': 1, 'no_english_caption': 1, 'png_without_caption_file': 1}
    is_broken_val = demo.is_val_stamp('food/broken.png')
    assert result.val_counts.skipped_by_reason == ({'image_undecodable': 1} if is_broken_val else {})
    assert result.train_counts.skipped_by_reason == ({} if is_broken_val else {'image_undecodable': 1})
    assert result.train_counts.written + result.val_counts.written == len(chosen)

    expected_val = [stamp for stamp in chosen if demo.is_val_stamp(stamp.relative_path)]
    expected_train = [stamp for stamp in chosen if not demo.is_val_stamp(stamp.relative_path)]
    val_rows = read_mds(out / 'val')
    train_rows = read_mds(out / 'train')
    assert [row['caption'] for row in val_rows] == [stamp.caption for stamp in expected_val]
    assert [row['caption'] for row in train_rows] == [stamp.caption for stamp in expected_train]
    assert [row['image'] for row in val_rows] == [stamp.image_path.read_bytes() for stamp in expected_val]

    val_classes = json.loads((out / 'val_classes.json').read_text(encoding='utf-8'))
    assert val_classes['classes'] == ['food', 'space', 'vehicles']
    assert [sample['path'] for sample in val_classes['samples']] == [stamp.relative_path for stamp in expected_val]
    assert [sample['index'] for sample in val_classes['samples']] == list(range(len(expected_val)))
    for sample in val_classes['samples']:
        assert sample['class'] == sample['path'].split('/')[0]
        assert val_classes['classes'][sample['label']] == sample['class']


def test_extract_stamps_package_from_local_deb(tmp_path):
    if shutil.which('dpkg-deb') is None:
        pytest.skip('dpkg-deb is not installed')
    package = tmp_path / 'package'
    stamp_folder = package / 'usr' / 'share' / 'tuxpaint' / 'stamps' / 'animals'
    stamp_folder.mkdir(parents=True)
    (stamp_folder / 'cat.png').write_bytes(encode(Image.fromarray(_pattern(16, 16, 0)), 'PNG'))
    (stamp_folder / 'cat.txt').write_text('A cat.\nfr.utf8=Un chat.\n', encoding='utf-8')
    (stamp_folder / 'cat.ogg').write_bytes(b'OggS not really a sound')
    (package / 'DEBIAN').mkdir()
    (package / 'DEBIAN' / 'control').write_text(
        'Package: tuxpaint-stamps-default\nVersion: 1.0\nArchitecture: all\n'
        'Maintainer: Test <test@example.invalid>\nDescription: test stamps\n', encoding='utf-8')
    cache = tmp_path / 'cache'
    cache.mkdir()
    subprocess.run(['dpkg-deb', '--build', '--root-owner-group', str(package),
                    str(cache / 'tuxpaint-stamps-default_1.0_all.deb')], check=True, capture_output=True)

    stamps_dir = demo.extract_stamps_package(cache)
    (cache / 'tuxpaint-stamps-default_1.0_all.deb').unlink()
    reused = demo.extract_stamps_package(cache)

    assert stamps_dir == cache / 'extracted' / 'usr' / 'share' / 'tuxpaint' / 'stamps'
    assert reused == stamps_dir
    listing = demo.list_stamps(stamps_dir)
    assert [(stamp.relative_path, stamp.caption, stamp.category) for stamp in listing.stamps] == [
        ('animals/cat.png', 'A cat.', 'animals')]
    assert sorted(path.name for path in cache.iterdir()) == ['extracted']
    assert sorted(path.name for path in (stamps_dir / 'animals').iterdir()) == ['cat.png', 'cat.txt']
