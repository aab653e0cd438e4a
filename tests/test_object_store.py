"""Training from shards and into checkpoints in an S3 store, with Composer's autoresume.

The store is a real S3-protocol server (moto) on 127.0.0.1; train.py reaches it through
S3_ENDPOINT_URL as it would reach AWS.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from composer_clip.data import write_image_text_mds
from composer_clip.data.demo import list_stamps, split_stamps

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = 'clip-runs'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def write_s3_shards(endpoint, stamps_dir, num_train):
    boto3.client('s3', endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    train, val = split_stamps(list_stamps(stamps_dir).stamps)
    for name, stamps in (('train', train[:num_train]), ('val', val[:16])):
        write_image_text_mds(((s.image_path.read_bytes(), s.caption) for s in stamps), f's3://{BUCKET}/demo/{name}')
    return f's3://{BUCKET}/demo'


@pytest.fixture()
def s3_shards(s3_server, tuxpaint_stamps):
    """Write 32 train and 16 held-out stamps as MDS shards into the S3 store."""
    return write_s3_shards(s3_server, tuxpaint_stamps, 32)


@pytest.fixture()
def s3_shards_96(s3_server, tuxpaint_stamps):
    """Write 96 train stamps (12 batches of 8) and 16 held-out stamps into the S3 store."""
    return write_s3_shards(s3_server, tuxpaint_stamps, 96)


def checkpoints_in_store(endpoint, prefix):
    listing = boto3.client('s3', endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted({match.group(0) for obj in listing.get('Contents', [])
                   for match in [re.search(r'ep\d+-ba\d+', obj['Key'])] if match})


def resumable_run_command(script_args, run_name, shards, work_dir, max_duration):
    """Launch 2 FSDP2 processes of the quick-start recipe on S3 data with checkpoints and autoresume in S3."""
    return [
        sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
        *script_args, str(REPO_ROOT / 'yamls' / 'quickstart.yaml'),
        f'run_name={run_name}',
        f'train_loader.remote={shards}/train',
        f'train_loader.local={work_dir}/cache/train',
        'train_loader.num_workers=0',
        f'eval_loader.remote={shards}/val',
        f'eval_loader.local={work_dir}/cache/val',
        'eval_loader.num_workers=0',
        'global_train_batch_size=8',
        'device_eval_batch_size=8',
        f'max_duration={max_duration}',
        'eval_interval=1000ba',
        'scheduler.t_warmup=1ba',
        f'save_folder=s3://{BUCKET}/checkpoints/{{run_name}}',
        'save_interval=1ba',
        'autoresume=true',
        'progress_bar=false',
        'zero_shot=null',
        'dist_timeout=60',
    ]


def train(tmp_path, run_label, shards, max_duration):
    """Run train.py on the quick-start recipe with S3 data and checkpoints."""
    command = resumable_run_command([str(REPO_ROOT / 'train.py')], 'resume-test', shards, tmp_path / run_label,
                                    max_duration)
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def test_autoresume_continues_from_store(tmp_path, s3_server, s3_shards):
    first = train(tmp_path, 'first', s3_shards, '2ba')

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert checkpoints_in_store(s3_server, 'checkpoints/resume-test/') == ['ep0-ba1', 'ep0-ba2']

    second = train(tmp_path, 'second', s3_shards, '4ba')

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert checkpoints_in_store(s3_server, 'checkpoints/resume-test/') == ['ep0-ba1', 'ep0-ba2', 'ep0-ba3', 'ep0-ba4']
    # The rerun loaded the newest checkpoint of the store and trained only the last 2 batches.
    assert 'Trained batches 3 to 4 on 2 ranks' in second.stdout
    assert 'Trained batches 1 to 2 on 2 ranks' in first.stdout


def private_shared_memory(command):
    """Run `command` in its own mount namespace with an empty /dev/shm, as on a separate machine.

    Streaming keeps per-node state in shared memory under /dev/shm, so two simulated nodes on one
    machine would otherwise collide. This needs root and util-linux's unshare.
    """
    return ['unshare', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', 'node', *command]


def can_isolate_shared_memory():
    probe = subprocess.run(private_shared_memory(['true']), capture_output=True)
    return probe.returncode == 0


def test_two_launchers_train_as_one_four_rank_job(tmp_path, s3_server, s3_shards):
    """Two Composer launchers on this machine act as two nodes of 2 processes each."""
    if not can_isolate_shared_memory():
        pytest.skip('needs root and unshare to give each simulated node its own /dev/shm')
    port = free_port()
    common = [
        f'train_loader.remote={s3_shards}/train',
        'train_loader.num_workers=0',
        f'eval_loader.remote={s3_shards}/val',
        'eval_loader.num_workers=0',
        'global_train_batch_size=8',
        'device_eval_batch_size=4',
        'max_duration=2ba',
        'eval_interval=2ba',
        'scheduler.t_warmup=1ba',
        'progress_bar=false',
        'zero_shot=null',
        'dist_timeout=120',
        # An empty store: every node must start from scratch without waiting or failing.
        'run_name=two-nodes',
        f'save_folder=s3://{BUCKET}/checkpoints/{{run_name}}',
        'save_interval=2ba',
        'autoresume=true',
    ]
    launchers = []
    for node_rank in range(2):
        node = tmp_path / f'node{node_rank}'
        node.mkdir()
        command = [
            sys.executable, '-m', 'composer.cli.launcher', '--world_size', '4', '--node_rank', str(node_rank),
            '-n', '2', '--master_addr', '127.0.0.1', '--master_port', str(port),
            str(REPO_ROOT / 'train.py'), str(REPO_ROOT / 'yamls' / 'quickstart.yaml'),
            f'train_loader.local={node}/cache/train', f'eval_loader.local={node}/cache/val', *common,
        ]
        launchers.append(subprocess.Popen(private_shared_memory(command), cwd=node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'}))

    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=600)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()

    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-4000:]
    # Global rank 0 lives on node 0 and reports for the whole job.
    assert 'Trained batches 1 to 2 on 4 ranks' in outputs[0]
    assert checkpoints_in_store(s3_server, 'checkpoints/two-nodes/') == ['ep0-ba2']


def tiny_tower_overrides():
    vision = json.dumps([
        {'name': 'timm', 'model_name': 'vit_tiny_patch16_224', 'image_size': 32, 'pretrained': False},
        {'name': 'timm', 'model_name': 'convnext_atto', 'image_size': 32, 'pretrained': False},
    ])
    text = json.dumps({'name': 'openclip_text', 'context_length': 16, 'width': 32, 'heads': 2, 'layers': 2})
    return [f'model.vision_encoders={vision}', f'model.text_encoder={text}', 'model.embed_dim=32']


def recorded_run(tmp_path, label, shards, run_name, max_duration='12ba'):
    """Start a recorded 2-process FSDP2 run in its own process group; return it and its record folder."""
    record_dir = tmp_path / label
    script = [str(REPO_ROOT / 'tests' / 'scripts' / 'train_and_record.py'), str(record_dir)]
    command = resumable_run_command(script, run_name, shards, record_dir, max_duration) + tiny_tower_overrides()
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    return process, record_dir


def latest_checkpoint(endpoint, prefix):
    """Return the checkpoint that the store's `latest` pointer names, the one autoresume loads."""
    client = boto3.client('s3', endpoint_url=endpoint)
    pointers = [obj['Key'] for obj in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get('Contents', [])
                if obj['Key'].endswith('.symlink')]
    if not pointers:
        return None
    target = client.get_object(Bucket=BUCKET, Key=pointers[0])['Body'].read().decode()
    return re.search(r'ep\d+-ba(\d+)', target).group(0)


def recorded_samples(record_dir):
    """Return {(rank, batch): sample indices} of a recorded run."""
    samples = {}
    for path in sorted(record_dir.glob('samples-rank*.jsonl')):
        rank = int(path.stem.removeprefix('samples-rank'))
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            samples[(rank, entry['batch'])] = entry['samples']
    return samples


def test_killed_run_resumes_as_if_uninterrupted(tmp_path, s3_server, s3_shards_96):
    reference, reference_dir = recorded_run(tmp_path, 'reference', s3_shards_96, 'uninterrupted')
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output[-4000:]

    killed, killed_dir = recorded_run(tmp_path, 'killed', s3_shards_96, 'interrupted')
    deadline = time.monotonic() + 300
    while latest_checkpoint(s3_server, 'checkpoints/interrupted/') in (None, 'ep0-ba1', 'ep0-ba2'):
        assert killed.poll() is None, killed.communicate()[0][-4000:]
        assert time.monotonic() < deadline, 'no complete checkpoint reached the store in time'
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    resume_point = latest_checkpoint(s3_server, 'checkpoints/interrupted/')
    assert resume_point != 'ep0-ba12'

    resumed, resumed_dir = recorded_run(tmp_path, 'resumed', s3_shards_96, 'interrupted')
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-4000:]

    start = int(re.search(r'Trained batches (\d+) to 12', output).group(1))
    assert f'ep0-ba{start - 1}' == resume_point

    # Batches before the resume point come from the killed run, the rest from the rerun.
    expected = recorded_samples(reference_dir)
    killed_samples = recorded_samples(killed_dir)
    resumed_samples = recorded_samples(resumed_dir)
    combined = {key: value for key, value in killed_samples.items() if key[1] < start}
    combined.update(resumed_samples)
    assert combined == expected
    seen = sorted(index for value in combined.values() for index in value)
    assert seen == list(range(96))

    final = torch.load(resumed_dir / 'final.pt', weights_only=True)
    reference_final = torch.load(reference_dir / 'final.pt', weights_only=True)
    assert set(final) == set(reference_final)
    for key, value in reference_final.items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-7, msg=key)
