"""Held-out evaluation of a Trainer run: eval mode, and the same numbers every time."""

import sys
from pathlib import Path

import pytest
import torch

from composer_clip.builders import build_trainer, load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_data import tiny_overrides, write_shards  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures('destroy_process_group')


def test_eval_repeats_exactly_in_eval_mode(tmp_path):
    write_shards(tmp_path / 'train', 16, {})
    write_shards(tmp_path / 'val', 12, {})
    overrides = tiny_overrides(tmp_path, tmp_path / 'metrics.txt', 'max_duration=1ba', 'eval_interval=1ba')
    trainer = build_trainer(load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), overrides))
    trainer.fit()
    model = trainer.state.model
    # The ResNet tower's BatchNorm would update its running statistics, and give other
    # features, if evaluation ran in training mode.
    batch_norm = next(module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d))
    running_mean = batch_norm.running_mean.clone()
    modes_seen = []
    hook = batch_norm.register_forward_hook(lambda module, inputs, output: modes_seen.append(module.training))

    trainer.eval()
    first = {name: float(value) for name, value in trainer.state.eval_metric_values.items()}
    trainer.eval()
    second = {name: float(value) for name, value in trainer.state.eval_metric_values.items()}
    hook.remove()
    trainer.close()

    assert 'i2t_recall@1/aggregate' in first
    assert first == second
    assert modes_seen
    assert not any(modes_seen)
    assert torch.equal(batch_norm.running_mean, running_mean)
    assert model.training
