"""FSDP2 sharding, mixed precision, activation checkpointing and checkpoints, without Composer.

One rule decides both the sharding units and the checkpointed blocks: the repeated blocks that
the encoders name through `block_modules()` (see `collect_block_modules`). `wrap_model_with_fsdp2`
and `setup_activation_checkpointing` apply it in plain PyTorch loops. Composer applies the same
rule through `build_block_predicate`, passed as `fsdp_wrap_fn` and `activation_checkpointing_fn`.

`fully_shard` rejects 0-dim parameters (torch 2.7), so sharding stores `logit_scale` and other
scalar parameters with shape [1]. Full state dicts from `get_fsdp2_state_dict` give them shape []
again, and `load_fsdp2_checkpoint` accepts either shape, so checkpoints move freely between
sharded and unsharded code.

Typical use, after `torch.distributed.init_process_group`::

    model = wrap_model_with_fsdp2(setup_activation_checkpointing(model), mp_policy='bf16')
    optimizer = torch.optim.AdamW(model.parameters())  # built after sharding
    ...
    dcp.save(get_fsdp2_state_dict(model, full_state_dict=False), checkpoint_id=folder)
    load_fsdp2_checkpoint(model, folder)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import resource
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from composer_clip.base_model import set_module_checkpointing

try:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    _FSDP2_IMPORT_ERROR = None
except ImportError as error:  # torch < 2.6 has fully_shard only under torch.distributed._composable
    FSDPModule = MixedPrecisionPolicy = fully_shard = None
    _FSDP2_IMPORT_ERROR = error

logger = logging.getLogger(__name__)

MIXED_PRECISION_DTYPES = {
    'bf16': torch.bfloat16,
    'fp16': torch.float16,
    'fp32': torch.float32,
}

# Name of the per-module attribute that records which parameters `reshape_scalar_parameters`
# turned from shape [] into shape [1]. It lives on the owning module, so it survives fully_shard,
# which swaps the parameter objects but keeps the module instance.
_SCALAR_PARAMETERS_ATTRIBUTE = '_fsdp2_scalar_parameter_names'

_SAFETENSORS_SUFFIX = '.safetensors'


# Availability and mixed precision.


def is_fsdp2_available() -> bool:
    """Return True when `torch.distributed.fsdp.fully_shard` exists (torch >= 2.6)."""
    return _FSDP2_IMPORT_ERROR is None


def require_fsdp2() -> None:
    """Raise RuntimeError when this torch has no `torch.distributed.fsdp.fully_shard`."""
    if not is_fsdp2_available():
        raise RuntimeError(
            f'FSDP2 needs torch >= 2.6, which provides torch.distributed.fsdp.fully_shard, but torch '
            f'{torch.__version__} is installed ({_FSDP2_IMPORT_ERROR}); upgrade torch')


# On torch < 2.6 the base is `object`, so that this module still imports; every function that
# would use the policy calls `require_fsdp2` first.
_PolicyBase: Any = MixedPrecisionPolicy if MixedPrecisionPolicy is not None else object


@dataclasses.dataclass(frozen=True)
class FSDP2MixedPrecisionPolicy(_PolicyBase):
    """`MixedPrecisionPolicy` plus the dtype of floating-point buffers.

    FSDP2 leaves buffers alone, so `wrap_model_with_fsdp2` casts the floating-point buffers of the
    model to `buffer_dtype` itself. None keeps their dtype.
    """

    buffer_dtype: Optional[torch.dtype] = None


def setup_fsdp2_mixed_precision(
    param_dtype: Optional[torch.dtype] = torch.bfloat16,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    buffer_dtype: Optional[torch.dtype] = None,
) -> FSDP2MixedPrecisionPolicy:
    """Build an FSDP2 mixed precision policy.

    Args:
        param_dtype: dtype of the unsharded parameters, used for the forward and backward compute
            and the all-gather. The sharded parameters, which the optimizer updates, keep their dtype.
        reduce_dtype: dtype of the gradient reduce-scatter.
        buffer_dtype: dtype that `wrap_model_with_fsdp2` casts floating-point buffers to; None
            keeps them as they are.

    Returns:
        An `FSDP2MixedPrecisionPolicy`, a `MixedPrecisionPolicy` that also stores `buffer_dtype`.
    """
    require_fsdp2()
    return FSDP2MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, buffer_dtype=buffer_dtype)


def resolve_mixed_precision_policy(
    mp_policy: Union[str, MixedPrecisionPolicy, None] = 'bf16',
    mixed_precision_policy: Optional[MixedPrecisionPolicy] = None,
) -> MixedPrecisionPolicy:
    """Return the policy for `mp_policy` ('bf16', 'fp16', 'fp32' or None), unless `mixed_precision_policy` is given.

    'bf16' and 'fp16' compute in that dtype and reduce gradients in float32, 'fp32' computes and
    reduces in float32, and None applies no casting at all (FSDP2's default policy).
    """
    require_fsdp2()
    if mixed_precision_policy is not None:
        if not isinstance(mixed_precision_policy, MixedPrecisionPolicy):
            raise TypeError(
                f'mixed_precision_policy is a {type(mixed_precision_policy).__name__}; pass a '
                'torch.distributed.fsdp.MixedPrecisionPolicy, for example from setup_fsdp2_mixed_precision()')
        return mixed_precision_policy

    if mp_policy is None:
        return MixedPrecisionPolicy()
    if isinstance(mp_policy, MixedPrecisionPolicy):
        return mp_policy
    if mp_policy not in MIXED_PRECISION_DTYPES:
        raise ValueError(
            f'mp_policy={mp_policy!r} is invalid; pass one of {sorted(MIXED_PRECISION_DTYPES)}, None, '
            'or a MixedPrecisionPolicy as mixed_precision_policy')
    return setup_fsdp2_mixed_precision(param_dtype=MIXED_PRECISION_DTYPES[mp_policy], reduce_dtype=torch.float32)


def _fully_shard_policy(policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """Return `policy` as a plain `MixedPrecisionPolicy`, without the fields FSDP2 does not know."""
    return MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        output_dtype=policy.output_dtype,
        cast_forward_inputs=policy.cast_forward_inputs,
    )


def cast_floating_point_buffers(model: nn.Module, dtype: Optional[torch.dtype]) -> int:
    """Cast every floating-point buffer of `model` to `dtype` in place and return how many changed."""
    if dtype is None:
        return 0

    count = 0
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
                count += 1
    return count


# Repeated blocks: the sharding units and the checkpointed modules.


def find_towers(
    model: nn.Module,
    vision_encoder_name: str = 'visual',
    text_encoder_name: str = 'text',
) -> list[nn.Module]:
    """Return the encoders of `model`, vision ones first, each once.

    The attributes `vision_encoder_name` and `text_encoder_name` come first (OpenCLIP's `visual`
    and `text`), each a module or an `nn.ModuleList` of modules. A side that has no such attribute
    falls back to the multi-encoder models' `vision_towers` or `text_towers`.
    """
    towers: list[nn.Module] = []
    for name, fallback in ((vision_encoder_name, 'vision_towers'), (text_encoder_name, 'text_towers')):
        found = _module_attribute(model, name)
        if found is None:
            found = _module_attribute(model, fallback)
        if found is None:
            continue

        members = list(found) if isinstance(found, nn.ModuleList) else [found]
        for tower in members:
            if tower is not model and not any(tower is known for known in towers):
                towers.append(tower)
    return towers


def _module_attribute(model: nn.Module, name: str) -> Optional[nn.Module]:
    # getattr also reaches properties such as MultiVisionCLIP.visual.
    try:
        value = getattr(model, name)
    except AttributeError:
        return None
    return value if isinstance(value, nn.Module) else None


def find_repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """Return the repeated blocks of an encoder that does not implement `block_modules()`.

    The blocks are the children of the longest `nn.ModuleList` or `nn.Sequential` in `module` whose
    two or more children share one class. Without such a container the list is empty.
    """
    candidates = []
    for container in module.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) > 1:
            if len({type(child) for child in container}) == 1:
                candidates.append(container)

    if not candidates:
        return []
    return list(max(candidates, key=len))


def collect_block_modules(model: nn.Module) -> list[nn.Module]:
    """Return the repeated blocks of every encoder in `model`, each once.

    Every module in `model` that has a `block_modules()` method contributes the blocks it returns,
    so every tower of the multi-encoder models and any encoder nested deeper is covered, and an
    encoder whose `block_modules()` returns nothing contributes nothing. A tower (see `find_towers`)
    without `block_modules()` contributes `find_repeated_blocks(tower)`.
    """
    blocks: list[nn.Module] = []
    seen: set[int] = set()

    def add(block: nn.Module) -> None:
        if id(block) not in seen:
            seen.add(id(block))
            blocks.append(block)

    for module in model.modules():
        block_modules = getattr(module, 'block_modules', None)
        if callable(block_modules):
            for block in block_modules():
                add(block)

    for tower in find_towers(model):
        if not callable(getattr(tower, 'block_modules', None)):
            for block in find_repeated_blocks(tower):
                add(block)
    return blocks


class BlockPredicate:
    """Callable `module -> bool` that is True for the repeated blocks of one model.

    It holds the blocks themselves, so it works after `fully_shard` (which keeps module
    instances), and a deep copy or pickle of the model together with the predicate maps the
    blocks to their copies.
    """

    def __init__(self, blocks: Iterable[nn.Module]):
        self.blocks = list(blocks)
        self._block_ids = frozenset(id(block) for block in self.blocks)

    def __call__(self, module: nn.Module) -> bool:
        return id(module) in self._block_ids

    def __len__(self) -> int:
        return len(self.blocks)

    def __getstate__(self) -> dict:
        return {'blocks': self.blocks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['blocks'])


def build_block_predicate(model: nn.Module) -> BlockPredicate:
    """Build the predicate for the sharding units and checkpointed blocks of `model`.

    Composer takes it as `fsdp_wrap_fn` and as `activation_checkpointing_fn`.
    """
    return BlockPredicate(collect_block_modules(model))


def _children_first(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Return the modules of `model` (not `model` itself) that match `predicate`, nested ones first.

    fully_shard must reach an inner module before the module around it.
    """
    modules = [module for module in model.modules() if module is not model and predicate(module)]
    return list(reversed(modules))


def _outermost(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """Return the blocks that are not inside another block."""
    nested_ids = set()
    for block in blocks:
        nested_ids.update(id(module) for module in block.modules() if module is not block)
    return [block for block in blocks if id(block) not in nested_ids]


# Scalar parameters.


def reshape_scalar_parameters(model: nn.Module) -> list[str]:
    """Store every 0-dim parameter of `model` with shape [1] and return their names.

    `fully_shard` rejects 0-dim parameters (torch 2.7), so this runs before sharding. The names are
    recorded on the owning modules, so `get_fsdp2_state_dict` can give full state dicts shape []
    again. Build the optimizer afterwards, because the parameter objects change.
    """
    names = []
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.ndim != 0:
                continue
            reshaped = nn.Parameter(parameter.detach().reshape(1).clone(), requires_grad=parameter.requires_grad)
            setattr(module, name, reshaped)

            recorded = module.__dict__.setdefault(_SCALAR_PARAMETERS_ATTRIBUTE, set())
            recorded.add(name)
            names.append(f'{module_name}.{name}' if module_name else name)
    return names


def scalar_parameter_names(model: nn.Module) -> list[str]:
    """Return the state-dict keys of the parameters that `reshape_scalar_parameters` reshaped."""
    names = []
    for module_name, module in model.named_modules():
        for name in sorted(module.__dict__.get(_SCALAR_PARAMETERS_ATTRIBUTE, ())):
            names.append(f'{module_name}.{name}' if module_name else name)
    return names


def restore_scalar_parameter_shapes(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Give the entries of reshaped scalar parameters shape [] again, in place, and return `state_dict`.

    Only full (non-DTensor) single-element entries change, so the result loads into unsharded
    OpenCLIP-style models.
    """
    for key in scalar_parameter_names(model):
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not _is_dtensor(value) and value.numel() == 1:
            state_dict[key] = value.reshape(())
    return state_dict


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


# Sharding and activation checkpointing.


def _check_can_shard(model: nn.Module, mesh) -> None:
    require_fsdp2()
    if isinstance(model, FSDPModule):
        raise ValueError(f'{type(model).__name__} is already sharded with fully_shard; wrap an unsharded model')
    if mesh is None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            'torch.distributed is not initialized; call torch.distributed.init_process_group() '
            '(torchrun sets its environment) or pass a DeviceMesh as mesh')


def _shard(
    model: nn.Module,
    units: Sequence[nn.Module],
    policy: MixedPrecisionPolicy,
    reshard_after_forward: Union[bool, int],
    mesh,
) -> None:
    """Reshape scalar parameters, cast buffers, then fully_shard each unit and finally the root."""
    reshaped = reshape_scalar_parameters(model)
    if reshaped:
        logger.info('Reshaped scalar parameters %s to shape [1] for fully_shard', reshaped)

    buffer_dtype = getattr(policy, 'buffer_dtype', None)
    cast_count = cast_floating_point_buffers(model, buffer_dtype)
    if cast_count:
        logger.info('Cast %d floating-point buffers to %s', cast_count, buffer_dtype)

    shard_policy = _fully_shard_policy(policy)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=shard_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=shard_policy)

    fix_gloo_gradient_average(model)


# Gradient averaging on gloo.


def _divide_gradients(reduce_output: torch.Tensor, world_size: int) -> None:
    # FSDP2 reduces float32 and bfloat16 gradients with ReduceOp.AVG and no divide factors. Other
    # dtypes (float16) use ReduceOp.SUM with its own pre- and post-divide, which is already correct.
    if reduce_output.dtype in (torch.float32, torch.bfloat16):
        reduce_output.div_(world_size)


def _reduce_scatter_average_sums(mesh) -> bool:
    """Return True when reduce_scatter_tensor with ReduceOp.AVG sums instead of averaging on `mesh`.

    A collective: every rank of `mesh` must call it.
    """
    group = mesh.get_group()
    size = group.size()
    if size == 1:
        return False

    values = torch.full((size,), float(dist.get_rank(group) + 1), device=mesh.device_type)
    output = torch.empty(1, device=mesh.device_type)
    dist.reduce_scatter_tensor(output, values, op=dist.ReduceOp.AVG, group=group)
    total = size * (size + 1) / 2
    return abs(output.item() - total) < 1e-6


def fix_gloo_gradient_average(model: nn.Module) -> int:
    """Make FSDP2 average gradients over ranks on gloo, where torch 2.7 sums them. Return the units fixed.

    FSDP2 reduce-scatters float32 and bfloat16 gradients with ReduceOp.AVG, which gloo's
    reduce_scatter_tensor treats as a sum (torch 2.7), so CPU gradients come out `world_size`
    times too large. When a one-element probe on the model's CPU mesh shows that behaviour, every
    FSDP2 unit of `model` gets an all-reduce hook that divides its reduced gradients by the world
    size. Call it once after sharding, on every rank (the probe is a collective);
    `wrap_model_with_fsdp2` and `wrap_vision_text_encoders_fsdp2` already do.

    TODO: drop this once the pinned torch fixes https://github.com/pytorch/pytorch/issues/162338;
    the probe then finds nothing to fix.
    """
    require_fsdp2()
    sharded = [parameter for parameter in model.parameters() if _is_dtensor(parameter)]
    if not sharded:
        return 0
    mesh = sharded[0].device_mesh
    if mesh.device_type != 'cpu' or mesh.ndim != 1 or not _reduce_scatter_average_sums(mesh):
        return 0

    hook = functools.partial(_divide_gradients, world_size=mesh.size())
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_all_reduce_hook(hook)
    logger.info(
        'gloo sums gradients under ReduceOp.AVG; dividing the gradients of %d FSDP2 units by %d',
        len(units), mesh.size())
    return len(units)


def wrap_model_with_fsdp2(
    model: nn.Module,
    mp_policy: Union[str, MixedPrecisionPolicy, None] = 'bf16',
    mixed_precision_policy: Optional[MixedPrecisionPolicy] = None,
    reshard_after_forward: Union[bool, int] = True,
    mesh=None,
) -> nn.Module:
    """Shard `model` with FSDP2: each repeated block of every encoder is a unit, then the root.

    The blocks are those of `collect_block_modules`: timm blocks, transformers layers, OpenCLIP
    residual blocks, and whatever a user encoder's `block_modules()` returns. Parameters outside
    the blocks (embeddings, projections, `logit_scale`) belong to the root unit. Scalar parameters
    get shape [1] first (see `reshape_scalar_parameters`).

    Args:
        model: the unsharded model, on the device it will run on.
        mp_policy: 'bf16', 'fp16', 'fp32' or None (see `resolve_mixed_precision_policy`).
        mixed_precision_policy: a `MixedPrecisionPolicy` that overrides `mp_policy`. With a
            `buffer_dtype` (from `setup_fsdp2_mixed_precision`), floating-point buffers are cast.
        reshard_after_forward: free the unsharded parameters after forward, as `fully_shard` does.
        mesh: the `DeviceMesh` to shard over; None shards over all ranks of the default group.

    Returns:
        `model`, sharded in place. Build the optimizer after this call.
    """
    _check_can_shard(model, mesh)
    policy = resolve_mixed_precision_policy(mp_policy, mixed_precision_policy)

    predicate = build_block_predicate(model)
    units = _children_first(model, predicate)
    if not units:
        logger.warning(
            '%s names no repeated blocks, so FSDP2 shards only the root and all-gathers every parameter at '
            'once; implement block_modules() on its encoders', type(model).__name__)

    _shard(model, units, policy, reshard_after_forward, mesh)
    logger.info(
        'Applied FSDP2 to %d blocks and the root of %s (param_dtype=%s, reduce_dtype=%s, reshard_after_forward=%s)',
        len(units), type(model).__name__, policy.param_dtype, policy.reduce_dtype, reshard_after_forward)
    return model


def wrap_vision_text_encoders_fsdp2(
    model: nn.Module,
    vision_encoder_name: str = 'visual',
    text_encoder_name: str = 'text',
    mp_policy: Union[str, MixedPrecisionPolicy, None] = 'bf16',
    mixed_precision_policy: Optional[MixedPrecisionPolicy] = None,
    reshard_after_forward: Union[bool, int] = True,
    mesh=None,
) -> nn.Module:
    """Shard `model` with FSDP2 with each encoder as one unit, then the root.

    The encoders are those of `find_towers`: each module, or each element of an `nn.ModuleList`,
    under `vision_encoder_name` and `text_encoder_name`, else under `vision_towers` and
    `text_towers`. Units are coarser than in `wrap_model_with_fsdp2`: fewer, larger all-gathers.
    The other arguments are those of `wrap_model_with_fsdp2`.

    Returns:
        `model`, sharded in place. Build the optimizer after this call.
    """
    _check_can_shard(model, mesh)
    policy = resolve_mixed_precision_policy(mp_policy, mixed_precision_policy)

    towers = find_towers(model, vision_encoder_name, text_encoder_name)
    if not towers:
        raise ValueError(
            f'{type(model).__name__} has no encoder under {vision_encoder_name!r}, {text_encoder_name!r}, '
            "'vision_towers' or 'text_towers'; pass the attribute names of its encoders")

    _shard(model, towers, policy, reshard_after_forward, mesh)
    logger.info(
        'Applied FSDP2 to %d encoders and the root of %s (param_dtype=%s, reduce_dtype=%s)',
        len(towers), type(model).__name__, policy.param_dtype, policy.reduce_dtype)
    return model


def setup_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint the activations of each repeated block of `model` (see `collect_block_modules`).

    Each block's forward runs under non-reentrant `torch.utils.checkpoint`, through
    `composer_clip.base_model.set_module_checkpointing`: the module keeps its class and
    state-dict keys, and batch norm statistics are not updated twice. The FSDP2 hooks sit outside
    the checkpointed forward, so this works before or after sharding. Only the outermost of nested
    blocks is checkpointed.

    Returns:
        `model`, changed in place.
    """
    blocks = _outermost(collect_block_modules(model))
    if not blocks:
        raise ValueError(
            f'{type(model).__name__} names no repeated blocks, so there is nothing to checkpoint; '
            'implement block_modules() on its encoders')

    for block in blocks:
        set_module_checkpointing(block, True)
    logger.info('Checkpointing the activations of %d blocks of %s', len(blocks), type(model).__name__)
    return model


# State dicts and checkpoints.


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _has_dtensors(model: nn.Module) -> bool:
    return any(_is_dtensor(parameter) for parameter in model.parameters())


def get_fsdp2_state_dict(model: nn.Module, full_state_dict: bool = True) -> dict[str, Any]:
    """Return the model state dict. A collective when torch.distributed is initialized: call it on every rank.

    With `full_state_dict=True`, rank 0 receives the full state dict on the CPU, with scalar
    parameters back at shape [], and the other ranks an empty dict. With `full_state_dict=False`,
    every rank receives its shards (DTensor values, scalar parameters at shape [1]), the input of
    `torch.distributed.checkpoint.save`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _is_distributed():
        state_dict = model.state_dict()
        if full_state_dict:
            state_dict = {key: value.detach().cpu() for key, value in state_dict.items()}
    else:
        options = StateDictOptions(full_state_dict=full_state_dict, cpu_offload=full_state_dict)
        state_dict = get_model_state_dict(model, options=options)

    if full_state_dict:
        restore_scalar_parameter_shapes(model, state_dict)
    return state_dict


def load_fsdp2_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load a checkpoint into `model`, sharded or not. A collective: call it on every rank.

    `path` is one of:

    - a folder written by `torch.distributed.checkpoint.save` from `get_fsdp2_state_dict(model,
      full_state_dict=False)`, at any world size;
    - a `.safetensors` file;
    - any other file: a state dict saved with `torch.save`, read with `weights_only=True`. A dict
      under a `state_dict` key and a `module.` prefix on every key (OpenCLIP's training
      checkpoints) are unwrapped.

    A scalar parameter loads from shape [] or [1]. Missing or unexpected keys, a size mismatch or
    an unreadable checkpoint on any rank raise RuntimeError on every rank, before any collective
    that would leave other ranks waiting.
    """
    path = Path(path)
    if path.is_dir():
        _load_sharded_checkpoint(model, path)
    else:
        _load_full_checkpoint(model, path)
    logger.info('Loaded checkpoint %s into %s', path, type(model).__name__)


def read_full_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a full state dict from a `.safetensors` file or a `torch.save` file (with `weights_only=True`)."""
    path = Path(path)
    if path.suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(str(path), device='cpu')

    # mmap keeps memory low when every rank of a node reads the same file.
    checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('state_dict'), Mapping):
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'{path} contains a {type(checkpoint).__name__}, not a state dict')

    state_dict = dict(checkpoint)
    if state_dict and all(key.startswith('module.') for key in state_dict):
        state_dict = {key[len('module.'):]: value for key, value in state_dict.items()}
    return state_dict


def _load_full_checkpoint(model: nn.Module, path: Path) -> None:
    model_shapes = _model_shapes(model)

    state_dict = None
    message = None
    try:
        state_dict = read_full_state_dict(path)
        checkpoint_shapes = {
            key: tuple(value.shape) if isinstance(value, torch.Tensor) else None
            for key, value in state_dict.items()
        }
        message = _mismatch_message(path, model_shapes, checkpoint_shapes)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        message = f'failed to read checkpoint {path}: {error}'
    _raise_if_any_rank_failed(message)

    state_dict = _match_scalar_shapes(state_dict, model_shapes)
    if _has_dtensors(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state_dict, strict=True)


def _load_sharded_checkpoint(model: nn.Module, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import distribute_tensor

    from composer_clip.safe_loading import enforce_weights_only_loading

    # torch.distributed.checkpoint unpickles metadata and non-tensor values without limits.
    enforce_weights_only_loading()
    model_state_dict = _sharded_model_state_dict(model)
    model_shapes = {
        key: tuple(value.shape) if isinstance(value, torch.Tensor) else None
        for key, value in model_state_dict.items()
    }

    checkpoint_shapes = {}
    message = None
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        for key, item in metadata.state_dict_metadata.items():
            checkpoint_shapes[key] = tuple(item.size) if isinstance(item, TensorStorageMetadata) else None
        message = _mismatch_message(path, model_shapes, checkpoint_shapes)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        message = f'failed to read the torch.distributed.checkpoint metadata in {path}: {error}'
    _raise_if_any_rank_failed(message)

    # A scalar parameter saved by sharded code has shape [1], by unsharded code shape []. Such an
    # entry is read whole into a plain tensor of the saved shape, then reshaped to the model's.
    load_state_dict = dict(model_state_dict)
    reshaped_keys = []
    for key, value in model_state_dict.items():
        if isinstance(value, torch.Tensor) and checkpoint_shapes[key] != tuple(value.shape):
            load_state_dict[key] = torch.empty(checkpoint_shapes[key], dtype=value.dtype)
            reshaped_keys.append(key)

    with warnings.catch_warnings():
        # Loading in a single process is intended here; torch warns about it even with no_dist=True.
        warnings.filterwarnings('ignore', message='torch.distributed is disabled', category=UserWarning)
        dcp.load(load_state_dict, checkpoint_id=str(path), no_dist=not _is_distributed())

    for key in reshaped_keys:
        target = model_state_dict[key]
        value = load_state_dict[key].reshape(target.shape)
        if _is_dtensor(target):
            # Every rank read the same full value, so no rank needs to send it.
            value = distribute_tensor(
                value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        load_state_dict[key] = value

    if _is_distributed() and _has_dtensors(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, load_state_dict, options=StateDictOptions(strict=True))
    else:
        model.load_state_dict(load_state_dict, strict=True)


def _sharded_model_state_dict(model: nn.Module) -> dict[str, Any]:
    if not _is_distributed():
        return model.state_dict()

    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _model_shapes(model: nn.Module) -> dict[str, tuple]:
    """Return the global shape of each state-dict entry of `model` (a DTensor's `shape` is global)."""
    return {
        key: tuple(value.shape) if isinstance(value, torch.Tensor) else None
        for key, value in model.state_dict().items()
    }


def _is_scalar_shape(shape: Optional[tuple]) -> bool:
    return shape in ((), (1,))


def _mismatch_message(path: Path, model_shapes: dict[str, tuple], checkpoint_shapes: dict[str, Optional[tuple]]) -> Optional[str]:
    """Return an error message listing missing and unexpected keys and size mismatches, or None."""
    missing = sorted(set(model_shapes) - set(checkpoint_shapes))
    unexpected = sorted(set(checkpoint_shapes) - set(model_shapes))

    mismatched = []
    for key in sorted(set(model_shapes) & set(checkpoint_shapes)):
        model_shape, checkpoint_shape = model_shapes[key], checkpoint_shapes[key]
        if model_shape is None:
            continue  # load_state_dict checks extra state that is not a tensor
        if checkpoint_shape is None:
            mismatched.append(f'{key} (not a tensor in the checkpoint)')
        elif checkpoint_shape != model_shape and not (_is_scalar_shape(model_shape) and _is_scalar_shape(checkpoint_shape)):
            mismatched.append(f'{key} (checkpoint {list(checkpoint_shape)}, model {list(model_shape)})')

    if not (missing or unexpected or mismatched):
        return None

    parts = [f'checkpoint {path} does not match the model:']
    if missing:
        parts.append(f'missing keys {missing}')
    if unexpected:
        parts.append(f'unexpected keys {unexpected}')
    if mismatched:
        parts.append(f'size mismatches {mismatched}')
    return ' '.join(parts) + '; load a checkpoint saved from this architecture'


def _match_scalar_shapes(state_dict: dict[str, Any], model_shapes: dict[str, tuple]) -> dict[str, Any]:
    """Reshape single-element entries between [] and [1] to the model's shape."""
    matched = dict(state_dict)
    for key, value in state_dict.items():
        model_shape = model_shapes[key]
        if isinstance(value, torch.Tensor) and model_shape is not None and tuple(value.shape) != model_shape:
            matched[key] = value.reshape(model_shape)
    return matched


def _raise_if_any_rank_failed(message: Optional[str]) -> None:
    """Raise RuntimeError on every rank when `message` is set on any rank.

    A rank that raised alone would leave the others waiting in the next collective.
    """
    if _is_distributed() and dist.get_world_size() > 1:
        messages: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    else:
        messages = [message]

    failures = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failures:
        return

    local = message if message is not None else failures[0][1]
    if len(messages) > 1:
        ranks = [rank for rank, _ in failures]
        raise RuntimeError(f'{local} (failed on ranks {ranks})')
    raise RuntimeError(local)


# Memory.


def _process_memory_bytes() -> tuple[Optional[int], int]:
    """Return the current and the peak resident set size of this process in bytes.

    The current size comes from /proc/self/statm, so it is None where /proc does not exist.
    """
    current = None
    try:
        with open('/proc/self/statm') as statm:
            current = int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        pass

    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform != 'darwin':
        peak *= 1024
    return current, peak


def log_fsdp2_memory_stats(rank: Optional[int] = 0) -> dict[str, Optional[int]]:
    """Log and return the memory use of this process, in bytes.

    The dict always has `rss_bytes` and `peak_rss_bytes` (process memory) and, with CUDA,
    `allocated_bytes`, `reserved_bytes` and `peak_allocated_bytes` of the current device. Only the
    rank `rank` logs (every rank when it is None); every rank returns its own numbers.
    """
    rss, peak_rss = _process_memory_bytes()
    stats: dict[str, Optional[int]] = {'rss_bytes': rss, 'peak_rss_bytes': peak_rss}

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats['allocated_bytes'] = torch.cuda.memory_allocated()
        stats['reserved_bytes'] = torch.cuda.memory_reserved()
        stats['peak_allocated_bytes'] = torch.cuda.max_memory_allocated()

    current_rank = dist.get_rank() if _is_distributed() else 0
    if rank is None or rank == current_rank:
        gib = 1024 ** 3
        text = ', '.join(
            f'{name[:-len("_bytes")]}={value / gib:.3f} GiB' for name, value in stats.items() if value is not None)
        logger.info('Memory on rank %d: %s', current_rank, text)
    return stats


__all__ = [
    'BlockPredicate',
    'FSDP2MixedPrecisionPolicy',
    'build_block_predicate',
    'collect_block_modules',
    'find_repeated_blocks',
    'find_towers',
    'fix_gloo_gradient_average',
    'get_fsdp2_state_dict',
    'is_fsdp2_available',
    'load_fsdp2_checkpoint',
    'log_fsdp2_memory_stats',
    'read_full_state_dict',
    'require_fsdp2',
    'reshape_scalar_parameters',
    'restore_scalar_parameter_shapes',
    'scalar_parameter_names',
    'setup_activation_checkpointing',
    'setup_fsdp2_mixed_precision',
    'wrap_model_with_fsdp2',
    'wrap_vision_text_encoders_fsdp2',
]
