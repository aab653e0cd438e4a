"""One Composer training step with 2 ranks equals one step of a single process.

Each rank trains on its half of a fixed global batch, under DDP and under Composer's
FSDP2 path. The updated weights must equal those of one process on the whole batch.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from composer import Trainer
from composer.utils.parallelism import FSDP2Config

from composer_clip.callbacks import ClampLogitScale
from composer_clip.composer_model import ComposerCLIP, clip_data_spec
from composer_clip.fsdp2_utils import fix_gloo_gradient_average, get_fsdp2_state_dict, reshape_scalar_parameters
from composer_clip.multi_encoder_model import MultiVisionCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss
from composer_clip.openclip_towers import OpenCLIPTextTransformer
from composer_clip.timm_model import TimmModel

GLOBAL_BATCH = 8
EMBED_DIM = 16


def build_composer_model(rank, world_size):
    torch.manual_seed(0)
    # No BatchNorm: its batch statistics differ between a local and the global batch.
    vision = [
        TimmModel('vit_tiny_patch16_224', EMBED_DIM, image_size=32),
        TimmModel('convnext_atto', EMBED_DIM, image_size=32),
    ]
    text = OpenCLIPTextTransformer(context_length=8, vocab_size=64, width=32, heads=2, layers=2, output_dim=EMBED_DIM)
    model = MultiVisionCLIP(vision, text, embed_dim=EMBED_DIM)
    loss_fn = OneToManyClipLoss(num_multi_encoders=2, aggregation='weighted', learnable_weights=True,
                                rank=rank, world_size=world_size)
    return ComposerCLIP(model, loss_fn)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    return {
        'images': [images, images.flip(-1)],
        'texts': [torch.randint(1, 64, (GLOBAL_BATCH, 8), generator=generator)],
        'sample_index': torch.arange(GLOBAL_BATCH),
    }


def local_batch(rank, world_size):
    size = GLOBAL_BATCH // world_size
    rows = slice(rank * size, (rank + 1) * size)
    batch = global_batch()
    return {
        'images': [images[rows] for images in batch['images']],
        'texts': [texts[rows] for texts in batch['texts']],
        'sample_index': batch['sample_index'][rows],
    }


def train_one_step(rank, world_size, mode, port, out_file):
    os.environ.update({
        'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(world_size),
        'LOCAL_WORLD_SIZE': str(world_size), 'NODE_RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
    })
    torch.set_num_threads(1)
    composer_model = build_composer_model(rank, world_size)
    parallelism_config = None
    if mode == 'fsdp2':
        reshape_scalar_parameters(composer_model)
        parallelism_config = {'fsdp': FSDP2Config(state_dict_type='sharded')}

    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([local_batch(rank, world_size)]),
        max_duration='1ba',
        device_train_microbatch_size=GLOBAL_BATCH // world_size,
        # SGD keeps the update linear in the gradient; Adam's first step divides by |gradient|,
        # which magnifies rounding differences of near-zero gradients.
        optimizers=torch.optim.SGD(composer_model.parameters(), lr=0.5),
        callbacks=[ClampLogitScale()],
        parallelism_config=parallelism_config,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        dist_timeout=60,
        seed=0,
    )
    if mode == 'fsdp2':
        fix_gloo_gradient_average(trainer.state.model)
    trainer.fit()

    if mode == 'fsdp2':
        state_dict = get_fsdp2_state_dict(composer_model, full_state_dict=True)
    else:
        state_dict = {key: value.detach().clone() for key, value in composer_model.state_dict().items()}
    if rank == 0:
        torch.save(state_dict, out_file)
    trainer.close()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(mode, world_size, out_file):
    mp.start_processes(
        train_one_step, args=(world_size, mode, free_port(), str(out_file)), nprocs=world_size, start_method='spawn'
    )
    return torch.load(out_file, weights_only=True)


@pytest.fixture(scope='module')
def single_process_weights(tmp_path_factory):
    return run('single', 1, tmp_path_factory.mktemp('single') / 'weights.pt')


@pytest.mark.parametrize('mode', ['ddp', 'fsdp2'])
def test_composer_step_matches_single_process(mode, single_process_weights, tmp_path):
    weights = run(mode, 2, tmp_path / 'weights.pt')
    initial = build_composer_model(0, 1).state_dict()

    assert set(weights) == set(single_process_weights)
    for key, expected in single_process_weights.items():
        assert weights[key].shape == expected.shape, key
        torch.testing.assert_close(weights[key], expected, rtol=1e-4, atol=1e-5, msg=key)
    # The step changed the weights, so the comparison is not between two untouched copies.
    changed = [key for key, value in initial.items() if value.is_floating_point()
               and not torch.equal(value, single_process_weights[key])]
    assert len(changed) > 0.8 * len(initial)
