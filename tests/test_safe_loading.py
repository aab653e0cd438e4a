"""Checkpoints load without running code from them, and remote model code runs only when trusted."""

import json
import pathlib
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from composer_clip.base_model import TransformersTextEncoder, TransformersVisionEncoder
from composer_clip.builders import build_trainer, load_config
from composer_clip.fsdp2_utils import load_fsdp2_checkpoint
from composer_clip.safe_loading import enforce_weights_only_loading

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_data import tiny_overrides, write_shards  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures('destroy_process_group')


class WritesMarker:
    """Unpickling this object writes a file: a stand-in for code that an attacker's checkpoint runs."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.path), 'code ran')


@pytest.fixture(scope='module')
def clean_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('clean_shards')
    write_shards(root / 'train', 16, {})
    write_shards(root / 'val', 8, {})
    return root


def build_tiny_trainer(shards: Path, tmp_path: Path, *extra: str):
    overrides = tiny_overrides(shards, tmp_path / 'metrics.txt', 'eval_interval=1ba', *extra)
    return build_trainer(load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), overrides))


def test_trainer_resumes_full_checkpoint_weights_only(clean_shards, tmp_path):
    trainer = build_tiny_trainer(clean_shards, tmp_path, 'max_duration=1ba', f'save_folder={tmp_path}/checkpoints',
                                 'save_interval=1ba')
    trainer.fit()
    trainer.close()
    checkpoint = tmp_path / 'checkpoints' / 'ep0-ba1-rank0.pt'
    saved = trainer.state.model.model.logit_scale.detach().clone()

    resumed = build_tiny_trainer(clean_shards, tmp_path, 'max_duration=2ba', f'load_path={checkpoint}')

    assert int(resumed.state.timestamp.batch) == 1
    assert torch.equal(resumed.state.model.model.logit_scale.detach(), saved)
    resumed.close()


def test_trainer_rejects_code_in_full_checkpoint(clean_shards, tmp_path):
    marker = tmp_path / 'marker.txt'
    checkpoint = tmp_path / 'evil.pt'
    torch.save({'state': {'model': {}}, 'rng': WritesMarker(marker)}, checkpoint)

    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        build_tiny_trainer(clean_shards, tmp_path, 'max_duration=1ba', f'load_path={checkpoint}')

    assert not marker.exists()


def test_sharded_metadata_with_code_rejected(tmp_path):
    model = torch.nn.Linear(2, 2)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / 'sharded'), no_dist=True)
    marker = tmp_path / 'marker.txt'
    (tmp_path / 'sharded' / '.metadata').write_bytes(pickle.dumps(WritesMarker(marker)))

    with pytest.raises(RuntimeError, match=r'references pathlib\._local\.Path\.write_text|references pathlib\.Path'):
        load_fsdp2_checkpoint(model, tmp_path / 'sharded')

    assert not marker.exists()


def test_sharded_value_with_code_rejected(tmp_path):
    marker = tmp_path / 'marker.txt'
    dcp.save({'weight': torch.ones(2), 'extra': WritesMarker(marker)}, checkpoint_id=str(tmp_path / 'sharded'),
             no_dist=True)
    assert not marker.exists()
    enforce_weights_only_loading()

    target = {'weight': torch.zeros(2), 'extra': None}
    with pytest.raises(CheckpointException) as error:
        dcp.load(target, checkpoint_id=str(tmp_path / 'sharded'), no_dist=True)

    [failure] = error.value.failures.values()
    assert 'Weights only load failed' in str(failure)

    assert not marker.exists()


def write_remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config names custom Python classes, like hub models with remote code."""
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({
        'model_type': 'composer_clip_remote_test',
        'auto_map': {'AutoConfig': 'configuration_remote.RemoteConfig', 'AutoModel': 'modeling_remote.RemoteModel'},
    }))
    (folder / 'configuration_remote.py').write_text(
        'import pathlib\n'
        f'pathlib.Path({str(marker)!r}).write_text("code ran")\n'
        'from transformers import PretrainedConfig\n'
        'class RemoteConfig(PretrainedConfig):\n'
        '    model_type = "composer_clip_remote_test"\n'
    )
    return folder


@pytest.mark.parametrize('encoder_class', [TransformersTextEncoder, TransformersVisionEncoder])
def test_remote_code_needs_trust(encoder_class, tmp_path):
    marker = tmp_path / 'marker.txt'
    folder = write_remote_code_model(tmp_path / 'remote_model', marker)

    with pytest.raises(ValueError, match=r'needs its own Python code .* set trust_remote_code: true'):
        encoder_class(str(folder), 8, pretrained=False)

    assert not marker.exists()
