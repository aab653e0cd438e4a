"""Plot a training run's metrics file: loss, logit scale, learning rate, held-out recall and zero-shot accuracy.

Reads the text file that Composer's FileLogger writes (train.py writes one by default,
see docs/quickstart.md), with lines such as

    [metric][batch=12]: loss/train/total: 3.1164

and draws one PNG with five panels over the batch number. Composer logs the training
loss of batch n at step n - 1 and the other metrics at the batch that just ended, so the
plot moves the loss one batch later. The FileLogger rounds floats to 4 decimals, so a learning rate below 1e-4
shows in steps of 1e-4.

Example:
    python scripts/plot_metrics.py runs/quickstart/metrics.txt --out runs/quickstart/metrics.png
"""

import argparse
import collections
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

# matplotlib comes with mosaicml-streaming, a dependency of composer_clip.
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRIC_LINE = re.compile(r'^\[metric\]\[batch=(\d+)\]: (.+): (\S+)\s*$')

Series = dict[str, list[tuple[int, float]]]


def parse_metrics_file(path: str | Path) -> Series:
    """Return {metric name: [(batch, value), ...]} in file order, from a FileLogger file.

    Lines that are not metrics (hyperparameters, captured output) and values that are not
    numbers are left out.
    """
    series: Series = collections.defaultdict(list)
    with open(path, encoding='utf-8') as file:
        for line in file:
            match = METRIC_LINE.match(line)
            if match is None:
                continue
            step, name, text = match.groups()
            try:
                value = float(text)
            except ValueError:
                continue
            series[name].append((int(step), value))
    return dict(series)


def select(series: Series, pattern: str) -> Series:
    """Return the series whose names match the regular expression `pattern`, sorted by name."""
    regex = re.compile(pattern)
    return {name: points for name, points in sorted(series.items()) if regex.fullmatch(name)}


def panel_series(series: Series, recall_k: int = 1) -> dict[str, Series]:
    """Return the series of each panel, keyed by the panel's title.

    The training loss moves one batch later, to the batch it was computed on, so that all
    panels share the batch axis.
    """
    training_loss = {
        name: [(step + 1, value) for step, value in points]
        for name, points in select(series, r'loss/train/.+').items()
    }
    return {
        'training loss': training_loss,
        'logit scale, exp(logit_scale)': select(series, r'logit_scale/exp(/.+)?'),
        'learning rate (the file rounds to 4 decimals)': select(series, r'lr-.+'),
        f'held-out recall@{recall_k}': select(series, rf'metrics/eval/(i2t|t2i)_recall@{recall_k}/.+'),
        'zero-shot accuracy': select(series, r'zero_shot/top\d+/.+'),
    }


def short_label(name: str) -> str:
    """Return a legend label: the metric name without the prefix its panel implies."""
    for prefix in ('metrics/eval/', 'loss/train/', 'zero_shot/', 'logit_scale/exp/', 'lr-'):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def line_style(name: str) -> dict:
    """Return plot settings: dashed for top-5 and text-to-image, thick for aggregates and totals."""
    dashed = '/top5/' in name or name.startswith('metrics/eval/t2i')
    thick = name.endswith('/aggregate') or name.endswith('/total')
    return {'linestyle': '--' if dashed else '-', 'linewidth': 2.0 if thick else 1.2}


def plot_metrics(series: Series, out: str | Path, title: Optional[str] = None, recall_k: int = 1) -> Path:
    """Draw the panels of `panel_series` into a PNG at `out` and return its path."""
    panels = panel_series(series, recall_k)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 4 * rows), squeeze=False)

    for axis, (panel_title, panel) in zip(axes.flat, panels.items()):
        axis.set_title(panel_title)
        axis.set_xlabel('batch')
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        if not panel:
            axis.text(0.5, 0.5, 'not in the metrics file', ha='center', va='center', transform=axis.transAxes)
            continue
        # One colour per view (the last part of the name), so that top-1 and top-5, or both
        # retrieval directions, of one view share it.
        views = list(dict.fromkeys(name.rsplit('/', 1)[-1] for name in panel))
        for name, points in panel.items():
            steps, values = zip(*points)
            color = f'C{views.index(name.rsplit("/", 1)[-1]) % 10}'
            marker = 'o' if len(points) < 30 else None
            axis.plot(steps, values, color=color, marker=marker, markersize=3, label=short_label(name),
                      **line_style(name))
        axis.legend(fontsize=7, loc='best', framealpha=0.6)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)

    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('metrics_file', help="a run's metrics file, written by Composer's FileLogger")
    parser.add_argument('--out', default=None, help='PNG to write (default: the metrics file with the suffix .png)')
    parser.add_argument('--recall-k', type=int, default=1, help='k of the held-out recall@k panel (default: 1)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    metrics_file = Path(args.metrics_file)
    if not metrics_file.is_file():
        sys.exit(f'metrics file {metrics_file} was not found; train.py writes runs/<run_name>/metrics.txt by default')

    series = parse_metrics_file(metrics_file)
    if not series:
        sys.exit(f'{metrics_file} contains no [metric] lines; pass a file written by Composer\'s FileLogger')
    out = plot_metrics(series, args.out or metrics_file.with_suffix('.png'), title=str(metrics_file), recall_k=args.recall_k)
    print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
