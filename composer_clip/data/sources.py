"""Readers of common image-caption layouts, yielding samples for `write_image_text_mds`.

Two layouts are supported: a CSV (or TSV) file with an image path column and a
caption column, and a folder tree where each image ``NAME.png`` has a caption file
``NAME.txt`` next to it.
"""

import csv
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

__all__ = [
    'IMAGE_EXTENSIONS',
    'ImageCaptionFiles',
    'find_image_caption_files',
    'iter_csv_samples',
    'iter_folder_samples',
    'read_caption_file',
]

log = logging.getLogger(__name__)

# File extensions (lower case) that Pillow decodes and that the folder reader treats as images.
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')
CAPTION_EXTENSION = '.txt'


@dataclasses.dataclass
class ImageCaptionFiles:
    """Images and caption files of a folder tree, matched by name.

    Attributes:
        pairs: ``(image path, caption file path)`` sorted by image path.
        images_without_caption: images that have no ``NAME.txt`` next to them.
        captions_without_image: caption files that no image matched.
    """

    pairs: list[tuple[Path, Path]]
    images_without_caption: list[Path]
    captions_without_image: list[Path]


def read_caption_file(path: Union[str, 'os.PathLike[str]']) -> Optional[str]:
    """Return the first non-empty line of a UTF-8 caption file, stripped.

    Returns '' when the file has no non-empty line, so that the writer counts the
    sample's caption as empty, and None when the file is not valid UTF-8 (logged as a
    warning with the path), so that the writer counts the caption as missing.
    """
    try:
        with open(path, encoding='utf-8-sig') as file:
            for line in file:
                if line.strip():
                    return line.strip()
    except UnicodeDecodeError as error:
        log.warning('Caption file %s is not valid UTF-8 (%s); its image is skipped', os.fspath(path), error)
        return None
    return ''


def find_image_caption_files(
    root: Union[str, 'os.PathLike[str]'],
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> ImageCaptionFiles:
    """Find the images under ``root`` and the caption file ``NAME.txt`` of each image ``NAME.EXT``.

    The search is recursive and extensions match case-insensitively. Two images with
    the same stem in one folder (``cat.png`` and ``cat.jpg``) share the caption file.

    Raises:
        NotADirectoryError: when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f'Image folder {root} does not exist or is not a folder')

    extensions = {extension.lower() for extension in image_extensions}
    images: list[Path] = []
    captions: set[Path] = set()
    for path in root.rglob('*'):
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in extensions:
            images.append(path)
        elif suffix == CAPTION_EXTENSION:
            captions.add(path)

    pairs: list[tuple[Path, Path]] = []
    images_without_caption: list[Path] = []
    matched: set[Path] = set()
    for image in sorted(images):
        caption = _find_caption_file(image, captions)
        if caption is None:
            images_without_caption.append(image)
        else:
            pairs.append((image, caption))
            matched.add(caption)

    captions_without_image = sorted(captions - matched)
    log.info(
        'Found %d images with caption files under %s, %d images without caption file, %d caption files without image',
        len(pairs), root, len(images_without_caption), len(captions_without_image),
    )
    return ImageCaptionFiles(pairs, images_without_caption, captions_without_image)


def iter_folder_samples(files: ImageCaptionFiles) -> Iterator[tuple[Path, Optional[str]]]:
    """Yield ``(image path, caption)`` for each matched pair; the caption is read lazily."""
    for image, caption_file in files.pairs:
        yield image, read_caption_file(caption_file)


def iter_csv_samples(
    csv_path: Union[str, 'os.PathLike[str]'],
    *,
    image_column: str = 'filepath',
    caption_column: str = 'title',
    image_root: Optional[Union[str, 'os.PathLike[str]']] = None,
    delimiter: str = ',',
) -> Iterator[tuple[Path, str]]:
    """Yield ``(image path, caption)`` for each row of a CSV file.

    The defaults ``filepath`` and ``title`` are the column names OpenCLIP's CSV
    loader uses. Relative image paths are resolved against ``image_root``, by default
    the CSV file's folder; absolute paths are used as they are.

    Raises:
        ValueError: when a column is missing; the message lists the columns found.
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent

    with open(csv_path, newline='', encoding='utf-8-sig') as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        found = reader.fieldnames or []
        missing = [column for column in (image_column, caption_column) if column not in found]
        if missing:
            raise ValueError(
                f'CSV file {csv_path} has no column(s) {missing}; its columns are {found} '
                f'(read with delimiter {delimiter!r}). Pass the image and caption column names.'
            )

        for row in reader:
            # DictReader fills the cells missing from a short row with None.
            image = (row[image_column] or '').strip()
            yield root / image, row[caption_column]


def _find_caption_file(image: Path, captions: set[Path]) -> Optional[Path]:
    exact = image.with_suffix(CAPTION_EXTENSION)
    if exact in captions:
        return exact

    upper = image.with_suffix(CAPTION_EXTENSION.upper())
    if upper in captions:
        return upper

    return None
