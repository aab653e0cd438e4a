"""Convert a folder tree of images with caption files into image-text MDS shards.

Each image NAME.EXT (png, jpg, jpeg, webp, gif, bmp, tif, tiff) pairs with the
caption file NAME.txt next to it. The caption is the first non-empty line of that
file. Images without a caption file and caption files without an image are counted
and logged.

Example:
    python scripts/convert_folder_to_mds.py photos/ --out data/photos_mds
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

from composer_clip.data import find_image_caption_files, iter_folder_samples, write_image_text_mds

log = logging.getLogger('convert_folder_to_mds')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help='folder searched recursively for images and NAME.txt caption files')
    parser.add_argument('--out', required=True,
                        help='output folder or object-store URI (s3://, gs://, oci://, ...) for the MDS shards')
    parser.add_argument('--compression', default=None, help="MDS shard compression such as 'zstd' (default: none)")
    parser.add_argument('--size-limit', default=str(1 << 26),
                        help="maximum shard size in bytes, or with a unit such as '64mb' (default: 67108864)")
    parser.add_argument('--overwrite', action='store_true',
                        help='delete the contents of an existing local --out folder instead of failing')
    parser.add_argument('--log-level', default='INFO', help='logging level (default: INFO)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')

    files = find_image_caption_files(args.folder)
    if files.images_without_caption:
        log.warning('Skipping %d images without a caption file, for example %s',
                    len(files.images_without_caption), files.images_without_caption[0])
    if files.captions_without_image:
        log.warning('Ignoring %d caption files without an image, for example %s',
                    len(files.captions_without_image), files.captions_without_image[0])

    counts = write_image_text_mds(
        iter_folder_samples(files),
        args.out,
        compression=args.compression,
        size_limit=int(args.size_limit) if args.size_limit.isdigit() else args.size_limit,
        exist_ok=args.overwrite,
    )
    log.info('Done: %d samples written, %d skipped %s, %d images without caption file, '
             '%d caption files without image', counts.written, counts.skipped, counts.skipped_by_reason,
             len(files.images_without_caption), len(files.captions_without_image))
    return 0


if __name__ == '__main__':
    sys.exit(main())
