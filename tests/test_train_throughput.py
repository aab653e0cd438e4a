"""scripts/benchmarks/train_throughput.py on the tiny model: both paths, one rank, on the CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from composer_clip.one_to_many_loss import OneToManyClipLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'scripts' / 'benchmarks' / 'train_throughput.py'
PEAK_TFLOPS = 0.5


def load_script_module():
    spec = importlib.util.spec_from_file_location('train_throughput', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_report(tmp_path_factory):
    """Run the benchmark on the tiny model with both paths and return (JSON report, printed output)."""
    out = tmp_path_factory.mktemp('throughput') / 'report.json'
    command = [
        sys.executable, str(SCRIPT), '--size', 'tiny', '--paths', 'plain,composer', '--steps', '3', '--warmup', '1',
        '--peak-tflops', str(PEAK_TFLOPS), '--out', str(out),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert completed.returncode == 0, f'the benchmark failed:\n{completed.stdout}\n{completed.stderr}'
    return json.loads(out.read_text()), completed.stdout


@pytest.fixture(scope='module')
def tiny_model_flops(tmp_path_factory, tiny_report):
    """Count one forward and backward of the tiny model with torch's FlopCounterMode.

    Returns (FLOPs of forward + loss + backward, forward FLOPs per tower). The math backend of
    scaled_dot_product_attention runs the attention as matmuls that the counter counts. The CPU's
    fused attention kernel has no FLOP formula in torch 2.7.
    """
    report, _ = tiny_report
    script = load_script_module()
    spec = dict(report['config']['model'])
    text_folder = script.write_text_model_folder(script.SIZES['tiny'], tmp_path_factory.mktemp('text_model'))
    spec['text_encoder'] = dict(spec['text_encoder'], model_name=str(text_folder))

    torch.manual_seed(0)
    model = script.build_model_from_spec(spec)
    images, texts = script.synthetic_batch(model, report['config']['batch_size'], 0, torch.device('cpu'))
    loss_fn = OneToManyClipLoss(num_multi_encoders=model.num_vision_encoders)

    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            model(images, texts)

        with FlopCounterMode(display=False) as training_counter:
            outputs = model(images, texts)
            loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
            loss.backward()

    counts = forward_counter.get_flop_counts()
    towers = ['MultiVisionCLIP.text_towers.0', 'MultiVisionCLIP.vision_towers.0', 'MultiVisionCLIP.vision_towers.1']
    forward_per_tower = [sum(counts[name].values()) for name in towers]
    return training_counter.get_total_flops(), forward_per_tower


def test_train_throughput_reports_both_paths(tiny_report):
    report, stdout = tiny_report

    assert list(report['paths']) == ['plain', 'composer']
    assert '| plain |' in stdout
    assert '| composer |' in stdout
    assert 'Composer / plain step time' in stdout
    assert f'torch {torch.__version__}' in stdout


@pytest.mark.parametrize('path', ['plain', 'composer'])
def test_train_throughput_rows_are_consistent(tiny_report, path):
    report, _ = tiny_report
    row = report['paths'][path]
    batch_size = report['config']['batch_size']

    assert row['step_seconds'] > 0
    assert row['samples_per_second'] == pytest.approx(batch_size / row['step_seconds'])
    # The step itself lies within the interval from the previous step's end.
    assert 0 < row['step_seconds_without_data_wait'] <= row['step_seconds']
    assert row['peak_memory_bytes'] > 2**20
    assert row['memory_kind'] == 'peak RSS of the rank process'
    assert row['achieved_tflops'] == pytest.approx(row['flops_per_step'] / row['step_seconds'] / 1e12)
    assert row['mfu'] == pytest.approx(row['achieved_tflops'] / PEAK_TFLOPS)
    assert len(row['per_rank_step_seconds']) == 1
    assert len(row['per_rank_step_seconds'][0]) == report['config']['warmup'] + report['config']['steps']


def test_train_throughput_ratio_is_composer_over_plain(tiny_report):
    report, _ = tiny_report
    paths = report['paths']

    expected = paths['composer']['step_seconds'] / paths['plain']['step_seconds']
    assert report['composer_over_plain']['step_seconds'] == pytest.approx(expected)


def test_train_throughput_flops_match_flop_counter(tiny_report, tiny_model_flops):
    report, _ = tiny_report
    counted_training, counted_forward_per_tower = tiny_model_flops
    batch_size = report['config']['batch_size']

    # The formula counts exactly the matmuls and convolutions that FlopCounterMode counts.
    assert report['flops']['per_step'] == counted_training
    assert report['paths']['plain']['flops_per_step'] == counted_training
    assert report['paths']['composer']['flops_per_step'] == counted_training
    for tower, counted in zip(report['flops']['towers'], counted_forward_per_tower):
        assert tower['forward_flops_per_sample'] * batch_size == counted, tower['tower']
