"""Training from shards and into checkpoints in an S3 store, with Composer's autoresume.

The store is a real S3-protocol server (moto) on 127.0.0.1; train.py reaches it through
S3_ENDPOINT_URL as it would reach AWS.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from composer_clip.data import write_image_text_mds
from composer_clip.data.demo import list_stamps, split_stamps

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = 'clip-runs'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_shards(s3_server, tuxpaint_stamps):
    """Write 32 train and 16 held-out stamps as MDS shards into the S3 store."""
    boto3.client('s3', endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    train, val = split_stamps(list_stamps(tuxpaint_stamps).stamps)
    for name, stamps in (('train', train[:32]), ('val', val[:16])):
        write_image_text_mds(((s.image_path.read_bytes(), s.caption) for s in stamps), f's3://{BUCKET}/demo/{name}')
    return f's3://{BUCKET}/demo'


def checkpoints_in_store(endpoint, prefix):
    listing = boto3.client('s3', endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted({match.group(0) for obj in listing.get('Contents', [])
                   for match in [re.search(r'ep\d+-ba\d+', obj['Key'])] if match})


def train(tmp_path, run_label, shards, max_duration, extra=()):
    """Run the quick-start pipeline with 2 FSDP2 processes on S3 data and checkpoints."""
    command = [
        sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
        str(REPO_ROOT / 'train.py'), str(REPO_ROOT / 'yamls' / 'quickstart.yaml'),
        'run_name=resume-test',
        f'train_loader.remote={shards}/train',
        f'train_loader.local={tmp_path}/{run_label}/cache/train',
        'train_loader.num_workers=0',
        f'eval_loader.remote={shards}/val',
        f'eval_loader.local={tmp_path}/{run_label}/cache/val',
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
        'dist_timeout=60',
        *extra,
    ]
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
        'dist_timeout=120',
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
