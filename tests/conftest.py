"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STAMPS_ENV_VAR = 'COMPOSER_CLIP_STAMPS_DIR'


@pytest.fixture(scope='session')
def tuxpaint_stamps() -> Path:
    """Return the folder of Tux Paint's stamps (animals/, food/, ...), real PNGs with English captions.

    Looked up in order: the COMPOSER_CLIP_STAMPS_DIR environment variable, the
    installed package at /usr/share/tuxpaint/stamps, and an extraction of the Debian
    package under .cache/demo in the repository (downloaded by apt-get once, then
    reused).
    """
    from composer_clip.data.demo import DEFAULT_STAMPS_DIR, extract_stamps_package

    configured = os.environ.get(STAMPS_ENV_VAR)
    if configured:
        stamps_dir = Path(configured)
        if not stamps_dir.is_dir():
            raise FileNotFoundError(f'{STAMPS_ENV_VAR}={configured} is not a folder; unset it or point it at the stamps')
        return stamps_dir

    if DEFAULT_STAMPS_DIR.is_dir():
        return DEFAULT_STAMPS_DIR

    return extract_stamps_package(REPO_ROOT / '.cache' / 'demo')
