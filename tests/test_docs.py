"""The code of docs/custom_encoder.md runs and behaves as the page describes."""

import re
import subprocess
import sys
from pathlib import Path

import catalogue
import pytest
import test_encoder_contract as contract
import torch
from PIL import Image

from composer_clip.builders import build_model, import_code_paths, load_config
from composer_clip.composer_model import ComposerCLIP
from composer_clip.data import build_image_transform
from composer_clip.one_to_many_loss import OneToManyClipLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
CUSTOM_ENCODER_PAGE = REPO_ROOT / 'docs' / 'custom_encoder.md'

CONTRACT_CHECKS = [
    contract.test_encoder_names_its_blocks,
    contract.test_lock_freezes_all_but_last_block,
    contract.test_lock_zero_freezes_every_block,
    contract.test_grad_checkpointing_keeps_gradients_with_first_block_frozen,
    contract.test_output_tokens_returns_features_and_tokens,
]


def page_files(page: Path) -> dict[str, str]:
    """Return the fenced code blocks of `page` whose first line is `# <file name>`, keyed by that name."""
    files = {}
    for block in re.findall(r'```(?:python|yaml)\n(.*?)```', page.read_text(), flags=re.DOTALL):
        match = re.fullmatch(r'# (\S+\.(?:py|yaml))', block.splitlines()[0])
        if match:
            files[match.group(1)] = block
    return files


@pytest.fixture(scope='module')
def page_folder(tmp_path_factory):
    """A folder with the files whose names head the code blocks of docs/custom_encoder.md."""
    folder = tmp_path_factory.mktemp('custom_encoder_page')
    for name, text in page_files(CUSTOM_ENCODER_PAGE).items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture()
def page_encoders(page_folder, monkeypatch):
    """Import the page's my_encoders.py as `code_paths` does. The import and its registrations are undone after the test."""
    monkeypatch.setattr(catalogue, 'REGISTRY', dict(catalogue.REGISTRY))
    monkeypatch.chdir(page_folder)
    module_name = 'composer_clip_user_code.my_encoders'
    import_code_paths(['my_encoders.py'])
    yield sys.modules[module_name]
    # The next test's import then registers the encoders again.
    del sys.modules[module_name]


def test_page_file_names(page_folder):
    names = sorted(path.name for path in page_folder.iterdir())

    assert names == ['check_encoders.py', 'my_encoders.py', 'tiny_clip.yaml']


def test_check_script_prints_stated_output(page_folder):
    stated = re.search(r'prints\n\n```text\n(.*?)```', CUSTOM_ENCODER_PAGE.read_text(), flags=re.DOTALL)

    result = subprocess.run(
        [sys.executable, 'check_encoders.py'], cwd=page_folder, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert stated is not None
    assert result.stdout == stated.group(1)


@pytest.mark.parametrize('check', CONTRACT_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize('name', ['tiny_conv', 'byte_text'])
def test_page_encoders_pass_contract(page_encoders, monkeypatch, name, check):
    # The entries that the page adds to the contract tests' ENCODERS table.
    monkeypatch.setitem(contract.ENCODERS, 'tiny_conv', lambda folders, output_tokens: page_encoders.TinyConvEncoder(
        16, image_size=contract.IMAGE_SIZE, output_tokens=output_tokens))
    monkeypatch.setitem(contract.ENCODERS, 'byte_text', lambda folders, output_tokens: page_encoders.ByteTextEncoder(
        16, context_length=contract.CONTEXT_LENGTH, output_tokens=output_tokens))

    check(None, name)


def test_page_recipe_builds_locked_units(page_encoders, page_folder):
    model = build_model(load_config(str(page_folder / 'tiny_clip.yaml')))
    composer_model = ComposerCLIP(model, OneToManyClipLoss(num_multi_encoders=2))
    tiny_conv = model.vision_towers[0]
    byte_text = model.text_towers[0]

    assert isinstance(tiny_conv, page_encoders.TinyConvEncoder)
    assert isinstance(byte_text, page_encoders.ByteTextEncoder)
    assert tiny_conv.output_dim == 64
    assert byte_text.output_dim == 64
    # lock: {unlocked_groups: 1} freezes the stem and the first two of three blocks.
    assert not any(parameter.requires_grad for parameter in tiny_conv.stem.parameters())
    assert not any(parameter.requires_grad for parameter in tiny_conv.blocks[1].parameters())
    assert all(parameter.requires_grad for parameter in tiny_conv.blocks[2].parameters())
    assert all(parameter.requires_grad for parameter in tiny_conv.proj.parameters())
    # Each named block is an FSDP2 unit and is checkpointed. The stem and the projection are neither.
    for block in [*tiny_conv.block_modules(), *byte_text.block_modules()]:
        assert model.fsdp_wrap_fn(block)
        assert composer_model.activation_checkpointing_fn(block)
    assert not model.fsdp_wrap_fn(tiny_conv.stem)
    assert not model.fsdp_wrap_fn(tiny_conv.proj)


def test_page_preprocessing_and_tokenizer(page_encoders):
    tiny_conv = page_encoders.TinyConvEncoder(8, image_size=64)
    byte_text = page_encoders.ByteTextEncoder(8, context_length=6)

    # A white image normalised with mean 0.5 and std 0.5 is 1.0 in every channel.
    pixels = build_image_transform(tiny_conv.preprocess_cfg, is_train=False)(Image.new('RGB', (80, 100), 'white'))
    token_ids = byte_text.get_tokenizer()(['ab', 'é', 'abcdefgh'])

    assert pixels.shape == (3, 64, 64)
    torch.testing.assert_close(pixels, torch.ones(3, 64, 64))
    assert token_ids.tolist() == [
        [ord('a') + 1, ord('b') + 1, 0, 0, 0, 0],
        [0xC3 + 1, 0xA9 + 1, 0, 0, 0, 0],
        [ord(character) + 1 for character in 'abcdef'],
    ]
