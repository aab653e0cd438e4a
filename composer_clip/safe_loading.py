"""Load checkpoints without running code from them.

`torch.load(..., weights_only=True)` unpickles only tensors, containers and an
allowlist of types, so a crafted checkpoint cannot run code. composer_clip's own loaders
use it (or safetensors). Two libraries it builds on unpickle with no such limit:

- Composer 0.32.1 reads full (monolithic) trainer checkpoints with
  `torch.load(weights_only=False)` in `composer.utils.checkpoint._torch_load_with_validation`.
- torch 2.7's `torch.distributed.checkpoint` reads a sharded checkpoint's `.metadata`
  file with `pickle.load`, and its non-tensor values with `torch.load(weights_only=False)`
  in `DefaultLoadPlanner.load_bytes`.

`enforce_weights_only_loading` replaces those three functions with versions that
accept only the types these checkpoints contain. `build_trainer` and
`load_fsdp2_checkpoint` call it, so every checkpoint that composer_clip loads goes
through an allowlist.
"""

from __future__ import annotations

import datetime
import io
import logging
import pathlib
import pickle
import sys
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed.checkpoint.default_planner as dcp_planner
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from torch.torch_version import TorchVersion

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = ['SAFE_CHECKPOINT_GLOBALS', 'enforce_weights_only_loading', 'load_checkpoint_file']

log = logging.getLogger(__name__)

# Types besides tensors and containers in Composer's trainer checkpoints: the numpy
# random state, the torch version and timestamps' durations.
SAFE_CHECKPOINT_GLOBALS = [
    _reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    type(np.dtype(np.float64)),
    type(np.dtype(np.int64)),
    TorchVersion,
    datetime.timedelta,
]

# Modules whose classes may appear in a torch.distributed.checkpoint `.metadata` file.
_METADATA_MODULES = frozenset({
    'torch.distributed.checkpoint.metadata',
    'torch.distributed.checkpoint.filesystem',
    'torch.distributed.checkpoint.planner',
})
# Single names allowed in `.metadata` files besides those modules' classes.
_METADATA_GLOBALS = frozenset({
    ('torch', 'Size'),
    ('torch.serialization', '_get_layout'),
    ('pathlib', 'PosixPath'),
    ('pathlib', 'WindowsPath'),
    ('pathlib', 'PurePosixPath'),
    ('collections', 'OrderedDict'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
})


def load_checkpoint_file(file: str | pathlib.Path | BinaryIO, map_location: Any = 'cpu') -> Any:
    """Load a `torch.save` file with `weights_only=True`, allowing `SAFE_CHECKPOINT_GLOBALS`."""
    with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
        return torch.load(file, map_location=map_location, weights_only=True)


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the types of a torch.distributed.checkpoint `.metadata` file."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f'the checkpoint metadata references {module}.{name}, which is not a checkpoint metadata type; '
            f'composer_clip does not load it because unpickling it could run code'
        )


def _read_metadata(self: dcp_filesystem.FileSystemReader) -> Any:
    path = self.fs.concat_path(self.path, '.metadata')
    with self.fs.create_stream(path, 'rb') as metadata_file:
        metadata = _MetadataUnpickler(metadata_file).load()
    if getattr(metadata, 'storage_meta', None) is None:
        metadata.storage_meta = dcp_filesystem.StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self: dcp_planner.DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    loaded = load_checkpoint_file(value)
    if self.flatten_state_dict:
        dcp_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


def _composer_torch_load(checkpoint_filepath: Any, map_location: str) -> Any:
    from composer.utils import checkpoint as composer_checkpoint

    return load_checkpoint_file(composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath), map_location)


def enforce_weights_only_loading() -> None:
    """Make Composer and torch.distributed.checkpoint load checkpoints through allowlists.

    Idempotent. A checkpoint with any other type fails with `pickle.UnpicklingError`.
    Composer's loader is replaced only when Composer is imported already, so call this
    again after importing it (`build_trainer` does).
    NOTE: replaces private functions of Composer 0.32.1 and torch 2.7. If a newer version
    renames them, this function raises AttributeError rather than leave loading unsafe.
    """
    targets = [(dcp_filesystem.FileSystemReader, 'read_metadata', _read_metadata),
               (dcp_planner.DefaultLoadPlanner, 'load_bytes', _load_bytes)]
    # Importing Composer here could fail (it checks the distributed environment on import),
    # so its loader is replaced only once something else has imported it, as the Trainer does.
    composer_checkpoint = sys.modules.get('composer.utils.checkpoint')
    if composer_checkpoint is not None:
        targets.append((composer_checkpoint, '_torch_load_with_validation', _composer_torch_load))

    for owner, name, _ in targets:
        if not hasattr(owner, name):
            raise AttributeError(f'{owner.__name__}.{name} was not found; this version of Composer or torch '
                                 f'is not supported by enforce_weights_only_loading')
    for owner, name, replacement in targets:
        setattr(owner, name, replacement)
