"""Build the demo image-text data set from Tux Paint's stamps (Debian package tuxpaint-stamps-default, GPL-2).

Writes <out>/train and <out>/val as MDS shards and <out>/val_classes.json, which
maps each validation sample to its category (animals, food, vehicles, ...). The
stamps come from --stamps-dir, else /usr/share/tuxpaint/stamps, else the package
is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
<out>/cache (no root needed). A stamp is in the validation split when the first
8 bytes of the SHA-256 of its path relative to the stamps folder, as a big-endian
integer, modulo 100 are below --val-percent. Rerunning reuses the unpacked
package and rewrites the shards.

Example:
    python scripts/prepare_demo_data.py --out data/demo
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

from composer_clip.data.demo import DEFAULT_VAL_PERCENT, prepare_demo_dataset

log = logging.getLogger('prepare_demo_data')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='output folder for train/, val/, val_classes.json and cache/')
    parser.add_argument('--stamps-dir', default=None,
                        help='folder with the stamps (the one that contains animals/, food/, ...), if already unpacked')
    parser.add_argument('--val-percent', type=int, default=DEFAULT_VAL_PERCENT,
                        help=f'percentage of stamps held out for validation (default: {DEFAULT_VAL_PERCENT})')
    parser.add_argument('--compression', default=None, help="MDS shard compression such as 'zstd' (default: none)")
    parser.add_argument('--log-level', default='INFO', help='logging level (default: INFO)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')

    demo = prepare_demo_dataset(
        args.out,
        stamps_dir=args.stamps_dir,
        val_percent=args.val_percent,
        compression=args.compression,
    )
    log.info('Done: %d train samples in %s, %d val samples in %s, classes in %s',
             demo.train_counts.written, demo.train_dir, demo.val_counts.written, demo.val_dir,
             demo.val_classes_file)
    return 0


if __name__ == '__main__':
    sys.exit(main())
