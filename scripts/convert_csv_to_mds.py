"""Convert a CSV of image paths and captions into image-text MDS shards.

Example:
    python scripts/convert_csv_to_mds.py data/train.csv --out s3://bucket/clip/train \\
        --image-column filepath --caption-column title
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

from composer_clip.data import iter_csv_samples, write_image_text_mds

log = logging.getLogger('convert_csv_to_mds')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('csv', help='CSV file with one row per image-caption pair')
    parser.add_argument('--out', required=True,
                        help='output folder or object-store URI (s3://, gs://, oci://, ...) for the MDS shards')
    parser.add_argument('--image-column', default='filepath', help='column with the image path (default: filepath)')
    parser.add_argument('--caption-column', default='title', help='column with the caption (default: title)')
    parser.add_argument('--image-root', default=None,
                        help='folder that relative image paths start from (default: the folder of the CSV file)')
    parser.add_argument('--delimiter', default=',',
                        help="field delimiter, one character; 'tab' or '\\t' for TSV files (default: ',')")
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

    delimiter = '\t' if args.delimiter in ('tab', '\\t') else args.delimiter
    if len(delimiter) != 1:
        log.error('--delimiter %r is invalid; pass one character, or tab', args.delimiter)
        return 2

    samples = iter_csv_samples(
        args.csv,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_root=args.image_root,
        delimiter=delimiter,
    )
    counts = write_image_text_mds(
        samples,
        args.out,
        compression=args.compression,
        size_limit=int(args.size_limit) if args.size_limit.isdigit() else args.size_limit,
        exist_ok=args.overwrite,
    )
    log.info('Done: %d samples written, %d skipped %s', counts.written, counts.skipped, counts.skipped_by_reason)
    return 0


if __name__ == '__main__':
    sys.exit(main())
