"""Tests of scripts/plot_metrics.py, the metric destinations of build_trainer and logit_scale logging.

One run of the quick-start recipe (tiny vision towers, 2 batches, one process) on real
Tux Paint stamps writes the default metrics file and TensorBoard events. The tests compare
what those files hold with the values in the trainer.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import InMemoryLogger, Logger
from torch import nn

from composer_clip.builders import build_loggers, build_trainer, load_config
from composer_clip.callbacks import ClampLogitScale
from composer_clip.data import write_image_text_mds
from composer_clip.data.demo import list_stamps, split_stamps

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'scripts' / 'plot_metrics.py'
RUN_NAME = 'plot-test'


def load_plot_metrics():
    spec = importlib.util.spec_from_file_location('plot_metrics', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_metrics = load_plot_metrics()


@pytest.fixture(scope='module')
def labelled_demo_shards(tuxpaint_stamps, tmp_path_factory):
    """32 train and 12 held-out stamps as MDS, with val_classes.json in the format of the demo data."""
    listing = list_stamps(tuxpaint_stamps)
    train, val = split_stamps(listing.stamps)
    root = tmp_path_factory.mktemp('labelled_demo')
    for name, stamps in (('train', train[:32]), ('val', val[:12])):
        write_image_text_mds(((stamp.image_path.read_bytes(), stamp.caption) for stamp in stamps), root / name)

    classes = sorted({stamp.category for stamp in listing.stamps})
    samples = [{'index': index, 'label': classes.index(stamp.category)} for index, stamp in enumerate(val[:12])]
    (root / 'val_classes.json').write_text(json.dumps({'classes': classes, 'samples': samples}))
    return root


@pytest.fixture(scope='module')
def short_run(labelled_demo_shards, tmp_path_factory):
    """Train 2 batches from the quick-start recipe with TensorBoard on; return the trainer and its work folder."""
    work_dir = tmp_path_factory.mktemp('run')
    vision = json.dumps([{'name': 'timm', 'model_name': 'resnet10t', 'image_size': 32, 'pretrained': False}])
    overrides = [
        f'variables.data_root={labelled_demo_shards}',
        f'model.vision_encoders={vision}',
        f'run_name={RUN_NAME}',
        'train_loader.num_workers=0',
        'eval_loader.num_workers=0',
        'global_train_batch_size=16',
        'device_eval_batch_size=8',
        'zero_shot.batch_size=8',
        'max_duration=2ba',
        'eval_interval=2ba',
        'scheduler.t_warmup=1ba',
        'parallelism_config=null',
        'progress_bar=false',
        f'loggers={{tensorboard: {{log_dir: {work_dir}/tensorboard}}}}',
    ]
    config = load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), overrides)

    with pytest.MonkeyPatch.context() as monkeypatch:
        # Without save_folder and metrics_file, the metrics file goes to runs/<run_name>/ under the working folder.
        monkeypatch.chdir(work_dir)
        trainer = build_trainer(config)
        trainer.fit()
        trainer.close()
    return trainer, work_dir


def test_metrics_file_has_default_path(short_run):
    _, work_dir = short_run

    assert (work_dir / 'runs' / RUN_NAME / 'metrics.txt').is_file()


def test_parse_metrics_file_matches_trainer(short_run):
    trainer, work_dir = short_run
    series = plot_metrics.parse_metrics_file(work_dir / 'runs' / RUN_NAME / 'metrics.txt')
    logit_scale = trainer.state.model.model.logit_scale.detach().exp().item()

    assert [step for step, _ in series['loss/train/total']] == [0, 1]
    assert [step for step, _ in series['logit_scale/exp']] == [1, 2]
    # The FileLogger writes floats with 4 decimals.
    assert series['logit_scale/exp'][-1][1] == pytest.approx(logit_scale, abs=5e-5)
    assert [step for step, _ in series['lr-AdamW/group0']] == [1, 2]
    for name in ('zero_shot/top1/aggregate', 'zero_shot/top5/aggregate'):
        expected = float(trainer.state.eval_metric_values[name])
        assert series[name] == [(2, pytest.approx(expected, abs=5e-5))], name
    recall = float(trainer.state.eval_metric_values['i2t_recall@1/aggregate'])
    assert series['metrics/eval/i2t_recall@1/aggregate'] == [(2, pytest.approx(recall, abs=5e-5))]


def test_panels_select_their_series(short_run):
    _, work_dir = short_run
    panels = plot_metrics.panel_series(plot_metrics.parse_metrics_file(work_dir / 'runs' / RUN_NAME / 'metrics.txt'))

    assert set(panels['training loss']) == {'loss/train/total', 'loss/train/vision_0'}
    # Composer logs batch n's loss at step n - 1; the panel draws it at batch n, like the others.
    assert [step for step, _ in panels['training loss']['loss/train/total']] == [1, 2]
    assert [step for step, _ in panels['logit scale, exp(logit_scale)']['logit_scale/exp']] == [1, 2]
    assert set(panels['logit scale, exp(logit_scale)']) == {'logit_scale/exp'}
    assert set(panels['learning rate (the file rounds to 4 decimals)']) == {'lr-AdamW/group0', 'lr-AdamW/group1'}
    assert set(panels['held-out recall@1']) == {'metrics/eval/i2t_recall@1/aggregate',
                                                 'metrics/eval/t2i_recall@1/aggregate'}
    assert set(panels['zero-shot accuracy']) == {'zero_shot/top1/aggregate', 'zero_shot/top5/aggregate'}


def test_plot_metrics_writes_png(short_run, tmp_path):
    _, work_dir = short_run
    out = tmp_path / 'plots' / 'metrics.png'

    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(work_dir / 'runs' / RUN_NAME / 'metrics.txt'), '--out', str(out)],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert out.stat().st_size > 20_000


def test_parse_metrics_file_skips_other_lines(tmp_path):
    metrics_file = tmp_path / 'metrics.txt'
    metrics_file.write_text(
        '[hyperparameter]: rank_zero_seed: 17 \n'
        '[metric][batch=0]: loss/train/total: 3.1164 \n'
        '[metric][batch=3]: metrics/eval/i2t_recall@1/aggregate: 0.0405 \n'
        '[metric][batch=3]: memory/rank0/allocated_gib: Tensor of shape torch.Size([2]) \n'
        '[metric][batch=4]: loss/train/total: 2.5 \n'
    )

    series = plot_metrics.parse_metrics_file(metrics_file)

    assert series == {
        'loss/train/total': [(0, 3.1164), (4, 2.5)],
        'metrics/eval/i2t_recall@1/aggregate': [(3, 0.0405)],
    }


def test_tensorboard_logger_writes_scalars(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, work_dir = short_run
    events = EventAccumulator(str(work_dir / 'tensorboard' / RUN_NAME))
    events.Reload()
    tags = events.Tags()['scalars']

    for tag in ('loss/train/total', 'logit_scale/exp', 'zero_shot/top1/aggregate', 'metrics/eval/i2t_recall@1/aggregate'):
        assert tag in tags, tag
    zero_shot = events.Scalars('zero_shot/top1/aggregate')
    assert [event.step for event in zero_shot] == [2]
    assert zero_shot[0].value == pytest.approx(float(trainer.state.eval_metric_values['zero_shot/top1/aggregate']))


def test_missing_logger_package_names_extra():
    if importlib.util.find_spec('wandb') is not None:
        pytest.skip('wandb is installed, so its logger builds')
    config = load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), ['loggers={wandb: {project: demo}}'])

    with pytest.raises(ImportError, match=r"pip install 'composer-clip\[wandb\]'"):
        build_loggers(config)


def test_unknown_logger_is_rejected():
    recipe = str(REPO_ROOT / 'yamls' / 'quickstart.yaml')
    config = load_config(recipe)
    config.loggers = {'mlflow': {}}

    with pytest.raises(ValueError, match=r"unknown keys \['mlflow'\] in loggers"):
        build_loggers(config)
    with pytest.raises(ValueError, match=r'unknown key loggers\.mlflow\. Valid keys'):
        load_config(recipe, ['loggers={mlflow: {}}'])


class ScaledModule(nn.Module):
    def __init__(self, logit_scale: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))
        self.proj = nn.Linear(2, 2)


def test_clamp_logit_scale_logs_each_scale():
    model = nn.ModuleDict({'first': ScaledModule(math.log(20.0)), 'second': ScaledModule(6.0)})
    state = State(model=model, rank_zero_seed=0, run_name='logit-scale', device=DeviceCPU())
    destination = InMemoryLogger()
    logger = Logger(state, destinations=[destination])
    destination.init(state, logger)

    ClampLogitScale().batch_end(state, logger)

    assert destination.most_recent_values['logit_scale/exp/first'] == pytest.approx(20.0)
    # ln(100) caps the second scale.
    assert destination.most_recent_values['logit_scale/exp/second'] == pytest.approx(100.0)
    assert model['second'].logit_scale.item() == pytest.approx(math.log(100))
