"""Demo image-text data set built from Tux Paint's stamps.

The Debian package ``tuxpaint-stamps-default`` (GPL-2) ships about 800 PNG stamps
under ``usr/share/tuxpaint/stamps/<category>/**/NAME.png``. Each has a ``NAME.txt``
whose first line is an English description and whose other lines are translations
such as ``fr.utf8=...``. The images are not part of this repository; this module
finds an installed copy or extracts the package without installing it.

Split rule: a stamp goes to the validation split when the SHA-256 digest of its
path relative to the stamps folder (POSIX separators, e.g. ``animals/cat.png``),
read as a big-endian integer from its first 8 bytes, modulo 100 is below
``val_percent`` (10 by default). The split therefore depends only on the path, not
on which other stamps are present.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

from composer_clip.data.mds import MDSWriteCounts, write_image_text_mds
from composer_clip.data.sources import find_image_caption_files, read_caption_file

__all__ = [
    'DEB_PACKAGE',
    'DEFAULT_STAMPS_DIR',
    'DEFAULT_VAL_PERCENT',
    'DemoDataset',
    'Stamp',
    'StampListing',
    'extract_stamps_package',
    'find_stamps_dir',
    'is_val_stamp',
    'list_stamps',
    'prepare_demo_dataset',
    'read_english_caption',
    'split_stamps',
]

log = logging.getLogger(__name__)

DEB_PACKAGE = 'tuxpaint-stamps-default'
DEFAULT_STAMPS_DIR = Path('/usr/share/tuxpaint/stamps')
DEFAULT_VAL_PERCENT = 10
STAMPS_SUBDIR = Path('usr/share/tuxpaint/stamps')
VAL_CLASSES_FILE = 'val_classes.json'
SOUND_EXTENSIONS = ('.ogg', '.wav')

# A translated line of a Tux Paint description: a locale such as 'fr', 'pt_BR' or
# 'ca@valencia', an optional '.utf8', then '='.
_TRANSLATION_LINE = re.compile(r'^[a-z]{2,3}(_[A-Z]{2})?(@[A-Za-z]+)?(\.utf-?8)?=', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Stamp:
    """One stamp: its PNG, English caption and category (top-level folder)."""

    relative_path: str
    image_path: Path
    caption: str
    category: str


@dataclasses.dataclass
class StampListing:
    """Stamps with an English caption, and the numbers of files left out per reason."""

    stamps: list[Stamp]
    skipped_by_reason: dict[str, int]


@dataclasses.dataclass
class DemoDataset:
    """Paths and sizes of a prepared demo data set."""

    train_dir: Path
    val_dir: Path
    val_classes_file: Path
    classes: list[str]
    train_counts: MDSWriteCounts
    val_counts: MDSWriteCounts
    skipped_by_reason: dict[str, int]


def read_english_caption(path: Union[str, 'os.PathLike[str]']) -> Optional[str]:
    """Return the English description of a Tux Paint stamp, or None when it has none.

    The English text is the first non-empty line of ``NAME.txt``, unless that line is
    a translation (``fr.utf8=...``).
    """
    line = read_caption_file(path)
    if line is None or _TRANSLATION_LINE.match(line):
        return None
    return line


def extract_stamps_package(cache_dir: Union[str, 'os.PathLike[str]']) -> Path:
    """Return the stamps folder of ``tuxpaint-stamps-default`` extracted under ``cache_dir``.

    An earlier extraction is reused. Otherwise a ``tuxpaint-stamps-default_*.deb`` in
    ``cache_dir`` is used, or ``apt-get download`` fetches one there (this needs an
    APT source list, no root). ``dpkg-deb -x`` unpacks it into a temporary folder
    that is renamed to ``cache_dir/extracted`` only when complete, so an interrupted
    run is never reused. The stamps' sound files (.ogg, .wav), about 190 MB of the
    230 MB in the 2022.06.04 package, are deleted before the rename.

    Raises:
        RuntimeError: when apt-get or dpkg-deb is missing or fails.
    """
    # Absolute, because the tools below run with the cache folder as working directory.
    cache_dir = Path(cache_dir).resolve()
    extracted = cache_dir / 'extracted'
    stamps_dir = extracted / STAMPS_SUBDIR
    if stamps_dir.is_dir():
        log.info('Reusing Tux Paint stamps extracted at %s', stamps_dir)
        return stamps_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    deb = _find_or_download_deb(cache_dir)

    staging = Path(tempfile.mkdtemp(prefix='extracting-', dir=cache_dir))
    try:
        _run_tool(['dpkg-deb', '-x', str(deb), str(staging)], cwd=cache_dir)
        if not (staging / STAMPS_SUBDIR).is_dir():
            raise RuntimeError(f'{deb} has no {STAMPS_SUBDIR} folder; delete it and run again to download it afresh')
        for path in (staging / STAMPS_SUBDIR).rglob('*'):
            if path.suffix.lower() in SOUND_EXTENSIONS and path.is_file():
                path.unlink()
        if extracted.exists():
            shutil.rmtree(extracted)
        staging.rename(extracted)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    log.info('Extracted %s to %s', deb.name, stamps_dir)
    return stamps_dir


def find_stamps_dir(
    stamps_dir: Optional[Union[str, 'os.PathLike[str]']] = None,
    cache_dir: Optional[Union[str, 'os.PathLike[str]']] = None,
) -> Path:
    """Locate the Tux Paint stamps folder.

    The order is: ``stamps_dir`` when given, then `DEFAULT_STAMPS_DIR` when the
    package is installed, then `extract_stamps_package` into ``cache_dir``.

    Raises:
        FileNotFoundError: when ``stamps_dir`` is given but is not a folder, or when
            nothing is found and ``cache_dir`` is None.
    """
    if stamps_dir is not None:
        stamps_dir = Path(stamps_dir)
        if not stamps_dir.is_dir():
            raise FileNotFoundError(f'Stamps folder {stamps_dir} does not exist; pass the folder that contains animals/, food/, ...')
        return stamps_dir

    if DEFAULT_STAMPS_DIR.is_dir():
        return DEFAULT_STAMPS_DIR

    if cache_dir is None:
        raise FileNotFoundError(
            f'{DEFAULT_STAMPS_DIR} does not exist; install {DEB_PACKAGE}, pass stamps_dir, '
            f'or pass cache_dir to extract the package there'
        )
    return extract_stamps_package(cache_dir)


def list_stamps(stamps_dir: Union[str, 'os.PathLike[str]']) -> StampListing:
    """List the PNG stamps that have an English caption, sorted by relative path.

    Left out and counted: PNGs without ``NAME.txt`` (mirrored variants such as
    ``*_mirror.png``), stamps whose first line is a translation, and caption files
    without a PNG (the SVG-only stamps).
    """
    stamps_dir = Path(stamps_dir)
    files = find_image_caption_files(stamps_dir, image_extensions=('.png',))

    stamps: list[Stamp] = []
    no_english_caption = 0
    for image_path, caption_file in files.pairs:
        caption = read_english_caption(caption_file)
        if caption is None:
            no_english_caption += 1
            continue
        relative_path = image_path.relative_to(stamps_dir).as_posix()
        category = relative_path.split('/', 1)[0]
        stamps.append(Stamp(relative_path, image_path, caption, category))

    skipped = {
        'caption_file_without_png': len(files.captions_without_image),
        'no_english_caption': no_english_caption,
        'png_without_caption_file': len(files.images_without_caption),
    }
    return StampListing(stamps, skipped)


def is_val_stamp(relative_path: str, val_percent: int = DEFAULT_VAL_PERCENT) -> bool:
    """Return whether a stamp belongs to the validation split (see the module docstring)."""
    digest = hashlib.sha256(relative_path.encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'big') % 100 < val_percent


def split_stamps(stamps: list[Stamp], val_percent: int = DEFAULT_VAL_PERCENT) -> tuple[list[Stamp], list[Stamp]]:
    """Split stamps into (train, val) by `is_val_stamp`, keeping their order."""
    if not 0 <= val_percent <= 100:
        raise ValueError(f'val_percent={val_percent} is invalid; use a percentage from 0 to 100')

    train: list[Stamp] = []
    val: list[Stamp] = []
    for stamp in stamps:
        if is_val_stamp(stamp.relative_path, val_percent):
            val.append(stamp)
        else:
            train.append(stamp)
    return train, val


def prepare_demo_dataset(
    out: Union[str, 'os.PathLike[str]'],
    *,
    stamps_dir: Optional[Union[str, 'os.PathLike[str]']] = None,
    val_percent: int = DEFAULT_VAL_PERCENT,
    compression: Optional[str] = None,
) -> DemoDataset:
    """Write the demo data set: ``<out>/train`` and ``<out>/val`` MDS and ``<out>/val_classes.json``.

    The stamps come from `find_stamps_dir` with ``<out>/cache`` as the extraction
    folder. Old shards are deleted first, so a rerun writes the same data again.
    Stamps that fail to decode are skipped and counted by the writer.

    ``val_classes.json`` maps each written validation sample, by its index in
    ``<out>/val``, to its category, for zero-shot classification:
    ``{"classes": [...], "samples": [{"index", "path", "class", "label"}, ...]}``
    where ``label`` is the position of ``class`` in ``classes``.
    """
    out = Path(out)
    stamps_dir = find_stamps_dir(stamps_dir, cache_dir=out / 'cache')
    listing = list_stamps(stamps_dir)
    train, val = split_stamps(listing.stamps, val_percent)
    log.info('Stamps: %d with English captions, %d train and %d val (%d%% rule); left out: %s',
             len(listing.stamps), len(train), len(val), val_percent, listing.skipped_by_reason)

    train_dir = out / 'train'
    val_dir = out / 'val'
    for split_dir in (train_dir, val_dir):
        if split_dir.exists():
            shutil.rmtree(split_dir)

    train_counts = write_image_text_mds(
        ((stamp.image_path, stamp.caption) for stamp in train),
        str(train_dir),
        compression=compression,
    )

    skipped_val: set[int] = set()
    val_counts = write_image_text_mds(
        ((stamp.image_path, stamp.caption) for stamp in val),
        str(val_dir),
        compression=compression,
        on_skip=lambda position, reason: skipped_val.add(position),
    )

    written_val = [stamp for position, stamp in enumerate(val) if position not in skipped_val]
    classes = sorted({stamp.category for stamp in listing.stamps})
    val_classes = {
        'split_rule': f'sha256(relative path)[:8] as big-endian int % 100 < {val_percent}',
        'classes': classes,
        'samples': [
            {'index': index, 'path': stamp.relative_path, 'class': stamp.category,
             'label': classes.index(stamp.category)}
            for index, stamp in enumerate(written_val)
        ],
    }
    val_classes_file = out / VAL_CLASSES_FILE
    val_classes_file.write_text(json.dumps(val_classes, indent=1) + '\n', encoding='utf-8')

    log.info('Demo data set at %s: %d train and %d val samples, %d classes',
             out, train_counts.written, val_counts.written, len(classes))
    return DemoDataset(
        train_dir=train_dir,
        val_dir=val_dir,
        val_classes_file=val_classes_file,
        classes=classes,
        train_counts=train_counts,
        val_counts=val_counts,
        skipped_by_reason=listing.skipped_by_reason,
    )


def _find_or_download_deb(cache_dir: Path) -> Path:
    debs = sorted(cache_dir.glob(f'{DEB_PACKAGE}_*.deb'))
    if debs:
        log.info('Using downloaded package %s', debs[-1])
        return debs[-1]

    log.info('Downloading %s with apt-get into %s', DEB_PACKAGE, cache_dir)
    try:
        _run_tool(['apt-get', 'download', DEB_PACKAGE], cwd=cache_dir)
    except RuntimeError:
        # A fresh machine may have empty package lists; root can fill them and retry.
        if os.geteuid() != 0:
            raise
        log.info('apt-get download failed; running apt-get update once and retrying')
        _run_tool(['apt-get', 'update', '-qq'], cwd=cache_dir)
        _run_tool(['apt-get', 'download', DEB_PACKAGE], cwd=cache_dir)
    debs = sorted(cache_dir.glob(f'{DEB_PACKAGE}_*.deb'))
    if not debs:
        raise RuntimeError(f'apt-get download {DEB_PACKAGE} wrote no .deb into {cache_dir}')
    return debs[-1]


def _run_tool(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None:
        raise RuntimeError(
            f'{command[0]} was not found; on Debian or Ubuntu it comes with apt and dpkg. Elsewhere, '
            f'extract {DEB_PACKAGE} by hand and pass its usr/share/tuxpaint/stamps folder as stamps_dir'
        )

    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f'{" ".join(command)} failed with exit code {result.returncode}: {result.stderr.strip()}. '
            f'If the package is unknown, run apt-get update first.'
        )
