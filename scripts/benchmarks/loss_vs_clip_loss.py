"""Forward and backward time of OneToManyClipLoss against OpenCLIP's ClipLoss, on one process.

The inputs are random normalised features: one anchor tensor (the text tower) and N
tensors (the vision towers), each (batch, dim), and a fixed logit scale. The batch here
is the whole batch on one process, so it plays the part of the global batch. Each
timed call runs the loss forward and backward to the features.

Variants:
- ours_mean: `OneToManyClipLoss(aggregation='mean')`. It averages the N tower features,
  re-normalises them and computes one contrastive loss against the anchor.
- ours_pairwise: `OneToManyClipLoss(aggregation='pairwise')`, the mean of the N
  contrastive losses between the anchor and each tower.
- clip_loss_per_tower: N calls of `open_clip.loss.ClipLoss`, one per tower, and their
  mean. It computes the same value as ours_pairwise.
- clip_loss_on_mean: one `ClipLoss` call on the features averaged and re-normalised by
  hand. It computes the same value as ours_mean.

With N = 1 all four compute the same loss. For N > 1 ours_mean / clip_loss_per_tower
compares two different losses: the mean aggregation computes one loss where the
per-tower calls compute N. The same-value ratios are ours_pairwise /
clip_loss_per_tower and ours_mean / clip_loss_on_mean.

The variants run one after another within each repetition, and the order rotates by
one place every repetition. Changes in machine load then reach all of them alike, and
each variant runs in every position and after each other variant. With the order
reversed every other repetition instead, the variant at the ends of the order ran 5%
slower at batch 2048 on the CPU, whatever it computed.

    python scripts/benchmarks/loss_vs_clip_loss.py
    python scripts/benchmarks/loss_vs_clip_loss.py --quick --out loss.json
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import write_summary  # noqa: E402
from composer_clip.one_to_many_loss import OneToManyClipLoss  # noqa: E402

VARIANTS = ('ours_mean', 'ours_pairwise', 'clip_loss_per_tower', 'clip_loss_on_mean')
LOGIT_SCALE = 1 / 0.07


def random_features(num_towers: int, batch_size: int, dim: int, seed: int):
    """Return a normalised anchor (batch, dim) and `num_towers` normalised (batch, dim) tensors, all leaves."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1) for _ in range(num_towers + 1)]
    for tensor in tensors:
        tensor.requires_grad_(True)
    return tensors[0], tensors[1:]


def build_variants(num_towers: int):
    """Return, per variant, a function (anchor, towers, logit_scale) -> scalar loss."""
    ours_mean = OneToManyClipLoss(num_multi_encoders=num_towers, aggregation='mean')
    ours_pairwise = OneToManyClipLoss(num_multi_encoders=num_towers, aggregation='pairwise')
    clip_loss = ClipLoss()

    def clip_loss_per_tower(anchor, towers, logit_scale):
        losses = [clip_loss(tower, anchor, logit_scale) for tower in towers]
        return torch.stack(losses).mean()

    def clip_loss_on_mean(anchor, towers, logit_scale):
        aggregate = F.normalize(torch.stack(towers).mean(dim=0), dim=-1)
        return clip_loss(aggregate, anchor, logit_scale)

    return {
        'ours_mean': ours_mean,
        'ours_pairwise': ours_pairwise,
        'clip_loss_per_tower': clip_loss_per_tower,
        'clip_loss_on_mean': clip_loss_on_mean,
    }


def run_once(loss_fn, anchor, towers, logit_scale):
    """Run one forward and backward.

    Returns (wall-clock seconds, CPU seconds of this process, loss value, gradients of
    the anchor and the towers).
    """
    for tensor in [anchor, *towers]:
        tensor.grad = None
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(anchor, towers, logit_scale)
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return seconds, cpu_seconds, loss.item(), [tensor.grad for tensor in [anchor, *towers]]


def max_gradient_difference(grads_a, grads_b, features) -> float:
    """Return the largest difference between two sets of gradients, tangent to the unit sphere.

    Models normalise the features they pass to the loss, so only the component of the
    gradient tangent to the sphere at each feature row reaches their parameters. The
    radial component differs between a loss that re-normalises its inputs and one that
    does not, so it is projected out before the comparison.
    """
    differences = []
    for grad_a, grad_b, rows in zip(grads_a, grads_b, features):
        difference = grad_a - grad_b
        rows = rows.detach()
        tangent = difference - (difference * rows).sum(dim=-1, keepdim=True) * rows
        differences.append(tangent.abs().max().item())
    return max(differences)


def measure(num_towers: int, batch_size: int, dim: int, repeats: int, warmup: int) -> dict:
    """Time every variant on one input; return medians, loss values and gradient differences."""
    seed = num_towers * 100_003 + batch_size
    anchor, towers = random_features(num_towers, batch_size, dim, seed)
    logit_scale = torch.tensor(LOGIT_SCALE)
    variants = build_variants(num_towers)

    times = {name: [] for name in VARIANTS}
    cpu_times = {name: [] for name in VARIANTS}
    losses, grads = {}, {}
    for repetition in range(warmup + repeats):
        shift = repetition % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for name in order:
            seconds, cpu_seconds, losses[name], grads[name] = run_once(variants[name], anchor, towers, logit_scale)
            if repetition >= warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    return {
        'num_towers': num_towers,
        'batch_size': batch_size,
        'seed': seed,
        'median_seconds': medians,
        'median_cpu_seconds': cpu_medians,
        'losses': losses,
        # Pairs of variants that compute the same value.
        'pairwise_loss_difference': abs(losses['ours_pairwise'] - losses['clip_loss_per_tower']),
        'mean_loss_difference': abs(losses['ours_mean'] - losses['clip_loss_on_mean']),
        'pairwise_grad_difference': max_gradient_difference(
            grads['ours_pairwise'], grads['clip_loss_per_tower'], [anchor, *towers]),
        'mean_grad_difference': max_gradient_difference(
            grads['ours_mean'], grads['clip_loss_on_mean'], [anchor, *towers]),
        'ratio_mean_to_per_tower': medians['ours_mean'] / medians['clip_loss_per_tower'],
        'ratio_pairwise_to_per_tower': medians['ours_pairwise'] / medians['clip_loss_per_tower'],
        'ratio_mean_to_clip_loss_on_mean': medians['ours_mean'] / medians['clip_loss_on_mean'],
        'cpu_ratio_mean_to_per_tower': cpu_medians['ours_mean'] / cpu_medians['clip_loss_per_tower'],
        'cpu_ratio_pairwise_to_per_tower': cpu_medians['ours_pairwise'] / cpu_medians['clip_loss_per_tower'],
        'cpu_ratio_mean_to_clip_loss_on_mean': cpu_medians['ours_mean'] / cpu_medians['clip_loss_on_mean'],
    }


def print_time_table(results: list[dict], clock: str) -> None:
    """Print the medians and ratios of one clock: '' for wall-clock time, 'cpu_' for CPU time."""
    print('| N | batch | ours_mean ms | ours_pairwise ms | clip_loss_per_tower ms | clip_loss_on_mean ms '
          '| mean / per_tower | pairwise / per_tower | mean / on_mean |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for result in results:
        ms = [result[f'median_{clock}seconds'][name] * 1000 for name in VARIANTS]
        ratios = [result[f'{clock}ratio_{pair}'] for pair in
                  ('mean_to_per_tower', 'pairwise_to_per_tower', 'mean_to_clip_loss_on_mean')]
        print(f'| {result["num_towers"]} | {result["batch_size"]} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | '
              f'{ms[3]:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} | {ratios[2]:.2f} |')


def print_tables(results: list[dict], header: str) -> None:
    print(header)
    print()
    print('Wall-clock time:')
    print_time_table(results, '')
    print()
    print('CPU time of the process:')
    print_time_table(results, 'cpu_')

    print()
    print('| N | batch | loss ours_mean | loss ours_pairwise | max abs difference of loss, same-value pairs '
          '| max abs difference of tangent gradients, same-value pairs |')
    print('| --- | --- | --- | --- | --- | --- |')
    for result in results:
        loss_difference = max(result['pairwise_loss_difference'], result['mean_loss_difference'])
        grad_difference = max(result['pairwise_grad_difference'], result['mean_grad_difference'])
        print(f'| {result["num_towers"]} | {result["batch_size"]} | {result["losses"]["ours_mean"]:.6f} | '
              f'{result["losses"]["ours_pairwise"]:.6f} | {loss_difference:.1e} | {grad_difference:.1e} |')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--towers', type=int, nargs='+', default=[1, 2, 4], help='numbers of towers N')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[256, 512, 1024, 2048, 4096],
                        help='batch sizes, all on this one process')
    parser.add_argument('--dim', type=int, default=512, help='feature dimension')
    parser.add_argument('--repeats', type=int, default=7, help='timed repetitions per variant')
    parser.add_argument('--warmup', type=int, default=2, help='untimed repetitions before the timed ones')
    parser.add_argument('--threads', type=int, help="torch's intra-op threads; torch's default when not given")
    parser.add_argument('--quick', action='store_true', help='N = 1, 2, batch 64 and 128, 3 repetitions')
    parser.add_argument('--out', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.quick:
        args.towers, args.batch_sizes, args.repeats, args.warmup = [1, 2], [64, 128], 3, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    results = [
        measure(num_towers, batch_size, args.dim, args.repeats, args.warmup)
        for num_towers in args.towers
        for batch_size in args.batch_sizes
    ]
    load_after = os.getloadavg()

    header = (f'feature dim {args.dim}, fp32 on the CPU, torch threads: {torch.get_num_threads()}, '
              f'torch {torch.__version__}, '
              f'median of {args.repeats} after {args.warmup} warm-up, '
              f'load average {load_before[0]:.2f} before and {load_after[0]:.2f} after')
    print_tables(results, header)

    if args.out:
        write_summary(args.out, 'loss_vs_clip_loss', (load_before[0], load_after[0]), results, dim=args.dim,
                      threads=torch.get_num_threads(), repeats=args.repeats)
    return results


if __name__ == '__main__':
    main()
