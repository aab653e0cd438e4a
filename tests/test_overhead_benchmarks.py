"""Quick runs of the overhead benchmarks in scripts/benchmarks: output structure, and equal results on both sides."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / 'scripts' / 'benchmarks'


def load_benchmark(name: str):
    """Import scripts/benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f'benchmark_{name}', BENCHMARKS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """Return a function that runs a benchmark's main with --quick once and returns (JSON summary, printed output)."""
    folder = tmp_path_factory.mktemp('benchmarks')
    runs = {}

    def run(name: str) -> tuple[dict, str]:
        if name not in runs:
            out = folder / f'{name}.json'
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                load_benchmark(name).main(['--quick', '--out', str(out)])
            runs[name] = (json.loads(out.read_text()), printed.getvalue())
        return runs[name]

    return run


def test_loss_benchmark_variants_agree(quick_run):
    summary, printed = quick_run('loss_vs_clip_loss')
    results = summary['results']

    assert [(r['num_towers'], r['batch_size']) for r in results] == [(1, 64), (1, 128), (2, 64), (2, 128)]
    assert '| N | batch | ours_mean ms |' in printed
    for result in results:
        assert set(result['median_seconds']) == {'ours_mean', 'ours_pairwise', 'clip_loss_per_tower',
                                                 'clip_loss_on_mean'}
        assert all(seconds > 0 for seconds in result['median_seconds'].values())
        assert result['pairwise_loss_difference'] < 1e-5
        assert result['mean_loss_difference'] < 1e-5
        assert result['pairwise_grad_difference'] < 1e-6
        assert result['mean_grad_difference'] < 1e-6


def test_loss_benchmark_one_tower_equals_clip_loss(quick_run):
    benchmark = load_benchmark('loss_vs_clip_loss')
    summary, _ = quick_run('loss_vs_clip_loss')

    for result in summary['results']:
        if result['num_towers'] != 1:
            continue
        # Recompute the inputs the script used and the loss with OpenCLIP alone.
        anchor, towers = benchmark.random_features(1, result['batch_size'], summary['dim'], result['seed'])
        expected = ClipLoss()(towers[0], anchor, torch.tensor(benchmark.LOGIT_SCALE)).item()
        for variant, loss in result['losses'].items():
            assert loss == pytest.approx(expected, rel=1e-6), variant


def test_clip_step_benchmark_losses_agree(quick_run):
    summary, printed = quick_run('clip_step_vs_openclip')
    (result,) = summary['results']

    assert result['model'] == 'tiny'
    assert '| model | parameters M | ours s | plain s | ours / plain |' in printed
    assert result['median_seconds']['ours'] > 0
    assert result['median_seconds']['plain'] > 0
    assert len(result['losses']['ours']) == len(result['losses']['plain']) == 4
    assert result['first_loss_difference'] < 1e-5
    assert result['max_loss_difference'] < 1e-4
    # Training moves the loss, so the steps after the first do run an optimizer step.
    assert result['losses']['ours'][-1] != result['losses']['ours'][0]


def test_trainer_benchmark_losses_agree(quick_run):
    summary, printed = quick_run('trainer_vs_loop')
    (result,) = summary['results']

    assert '| model | trainer s | loop s | trainer / loop |' in printed
    assert result['median_seconds']['trainer'] > 0
    assert result['median_seconds']['loop'] > 0
    assert len(result['losses']['trainer']) == len(result['losses']['loop']) == 4
    assert result['first_loss_difference'] < 1e-5
    assert result['max_loss_difference'] < 1e-4
    assert result['losses']['loop'][-1] != result['losses']['loop'][0]


def test_data_benchmark_loaders_agree(quick_run):
    summary, printed = quick_run('data_pipeline')
    results = summary['results']

    assert [result['num_workers'] for result in results] == [1, 2]
    assert '| workers | streaming samples/s | plain samples/s |' in printed
    for result in results:
        assert result['median_samples_per_second']['streaming'] > 0
        assert result['median_samples_per_second']['plain'] > 0
        for variant in ('streaming', 'plain'):
            assert result['samples_per_epoch'][variant] == {'samples': 64, 'distinct_samples': 64}
        assert result['check']['samples_compared'] == 32
        assert result['check']['max_image_difference'] == 0.0
        assert result['check']['token_mismatches'] == 0
