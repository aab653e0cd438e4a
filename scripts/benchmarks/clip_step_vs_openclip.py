"""Training step time of MultiVisionCLIP with one vision tower against a plain OpenCLIP loop.

Both sides train the same OpenCLIP model with the same weights, on the CPU in fp32:

- plain: `open_clip.create_model(name)` called on (images, tokens), `open_clip.loss.ClipLoss`,
  AdamW, and the clamp of `logit_scale` to [0, ln(100)] after each step, as OpenCLIP's
  training script does it.
- ours: `MultiVisionCLIP` over the towers that `vision_tower_from_openclip` and
  `text_tower_from_openclip` take from a checkpoint of that same model, with
  `OneToManyClipLoss(num_multi_encoders=1)`, the same AdamW settings and
  `clamp_logit_scale()` after each step.

A step is forward, loss, backward, optimizer step, zeroing the gradients and the clamp,
and the batch is already in memory. The two sides alternate step by step, in reversed
order every other repetition, so that changes in machine load reach both alike. Both
see the same batches in the same order, so their losses agree step by step up to
rounding. The script reports the median wall-clock time and the median CPU time of the
process per step. On a machine shared with other work, the CPU time with `--threads 1`
is the steadier figure.

    python scripts/benchmarks/clip_step_vs_openclip.py
    python scripts/benchmarks/clip_step_vs_openclip.py --models small ViT-B-32 --threads 1 --out step.json
    python scripts/benchmarks/clip_step_vs_openclip.py --quick

Models:
- ViT-B-32: OpenCLIP's ViT-B/32 (151 M parameters) with random weights, 224 px images
  and 77 tokens.
- small: a 4-block ViT of width 256 on 96 px images and a 4-block text transformer of
  width 256 on 32 tokens, embedding width 256.
- tiny: 2 blocks of width 64 on each side, 32 px images and 16 tokens, for `--quick`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import write_summary  # noqa: E402
from composer_clip.multi_encoder_model import MAX_LOGIT_SCALE, MultiVisionCLIP  # noqa: E402
from composer_clip.one_to_many_loss import OneToManyClipLoss  # noqa: E402
from composer_clip.openclip_towers import text_tower_from_openclip, vision_tower_from_openclip  # noqa: E402

# OpenCLIP model configs for the models that OpenCLIP does not ship, in its JSON format.
EXTRA_CONFIGS = {
    'benchmark-small-vit': {
        'embed_dim': 256,
        'vision_cfg': {'image_size': 96, 'layers': 4, 'width': 256, 'head_width': 64, 'patch_size': 16},
        'text_cfg': {'context_length': 32, 'vocab_size': 49408, 'width': 256, 'heads': 4, 'layers': 4},
    },
    'benchmark-tiny-vit': {
        'embed_dim': 64,
        'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 8},
        'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2},
    },
}
MODEL_NAMES = {'ViT-B-32': 'ViT-B-32', 'small': 'benchmark-small-vit', 'tiny': 'benchmark-tiny-vit'}

# The defaults of OpenCLIP's training script for ViT models (open_clip_train 3.3.0, params.py). That
# script exempts gains, biases and logit_scale from weight decay, but both sides here decay every parameter.
LEARNING_RATE = 5e-4
WEIGHT_DECAY = 0.2
BETAS = (0.9, 0.98)
EPS = 1e-6


def register_extra_configs(folder: str) -> None:
    """Write `EXTRA_CONFIGS` as JSON files into `folder` and register them with OpenCLIP."""
    for name, config in EXTRA_CONFIGS.items():
        Path(folder, f'{name}.json').write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def build_pair(model: str, folder: str, seed: int = 0):
    """Build OpenCLIP's model and our MultiVisionCLIP with the same weights.

    Returns (plain model, our model, tokenizer, image size, context length). Our towers
    are loaded from a checkpoint of the plain model, so no tensor is shared between them.
    """
    name = MODEL_NAMES[model]
    torch.manual_seed(seed)
    plain = open_clip.create_model(name, pretrained=None)
    checkpoint = os.path.join(folder, f'{name}.pt')
    torch.save(plain.state_dict(), checkpoint)

    vision = vision_tower_from_openclip(name, pretrained=checkpoint)
    text = text_tower_from_openclip(name, pretrained=checkpoint)
    ours = MultiVisionCLIP([vision], text, embed_dim=vision.output_dim)
    with torch.no_grad():
        ours.logit_scale.copy_(plain.logit_scale)

    plain.train()
    ours.train()
    return plain, ours, text.get_tokenizer(), vision.image_size, text.context_length


def build_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)


def synthetic_batches(tokenizer, image_size, num_batches: int, batch_size: int, seed: int = 1):
    """Return `num_batches` pairs (images (batch, 3, H, W), token ids (batch, context_length))."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    batches = []
    for index in range(num_batches):
        images = torch.randn(batch_size, 3, height, width, generator=generator)
        captions = [f'a photo of object {index * batch_size + row} on a plain background' for row in range(batch_size)]
        batches.append((images, tokenizer(captions)))
    return batches


class PlainStep:
    """One training step of OpenCLIP's model with ClipLoss, as a plain PyTorch loop writes it."""

    def __init__(self, model):
        self.model = model
        self.loss_fn = ClipLoss()
        self.optimizer = build_optimizer(model)

    def __call__(self, images, texts) -> float:
        image_features, text_features, logit_scale = self.model(images, texts)
        loss = self.loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.item()


class OurStep:
    """One training step of MultiVisionCLIP with OneToManyClipLoss."""

    def __init__(self, model: MultiVisionCLIP):
        self.model = model
        self.loss_fn = OneToManyClipLoss(num_multi_encoders=1)
        self.optimizer = build_optimizer(model)

    def __call__(self, images, texts) -> float:
        outputs = self.model(images, texts)
        loss = self.loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        return loss.item()


def measure(model: str, steps: int, warmup: int, batch_size: int, folder: str) -> dict:
    """Train both sides for `warmup + steps` alternating steps; return medians and the losses."""
    plain_model, our_model, tokenizer, image_size, context_length = build_pair(model, folder)
    runners = {'ours': OurStep(our_model), 'plain': PlainStep(plain_model)}
    batches = synthetic_batches(tokenizer, image_size, num_batches=4, batch_size=batch_size)

    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    losses = {name: [] for name in runners}
    for step in range(warmup + steps):
        images, texts = batches[step % len(batches)]
        order = ('ours', 'plain') if step % 2 == 0 else ('plain', 'ours')
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name].append(runners[name](images, texts))
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    return {
        'model': model,
        'batch_size': batch_size,
        'image_size': list(image_size) if isinstance(image_size, tuple) else image_size,
        'context_length': context_length,
        'parameters': sum(p.numel() for p in our_model.parameters()),
        'median_seconds': medians,
        'median_cpu_seconds': cpu_medians,
        'ratio': medians['ours'] / medians['plain'],
        'cpu_ratio': cpu_medians['ours'] / cpu_medians['plain'],
        'losses': losses,
        'first_loss_difference': abs(losses['ours'][0] - losses['plain'][0]),
        'max_loss_difference': max(abs(a - b) for a, b in zip(losses['ours'], losses['plain'])),
    }


def parse_step_arguments(argv, description: str) -> argparse.Namespace:
    """Parse the options of the step benchmarks, apply --quick and set torch's thread count."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['small'], choices=sorted(MODEL_NAMES))
    parser.add_argument('--steps', type=int, default=20, help='timed steps per side')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per side before the timed ones')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, help="torch's intra-op threads; torch's default when not given")
    parser.add_argument('--quick', action='store_true', help='the tiny model, batch 8, 3 timed steps')
    parser.add_argument('--out', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.steps, args.warmup = ['tiny'], 8, 3, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None):
    args = parse_step_arguments(argv, __doc__)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        register_extra_configs(folder)
        results = [measure(model, args.steps, args.warmup, args.batch_size, folder) for model in args.models]
    load_after = os.getloadavg()

    print(f'fp32 on the CPU, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, '
          f'torch {torch.__version__}, '
          f'open_clip {open_clip.__version__}, median of {args.steps} steps after {args.warmup} warm-up, '
          f'load average {load_before[0]:.2f} before and {load_after[0]:.2f} after')
    print('| model | parameters M | ours s | plain s | ours / plain | ours CPU s | plain CPU s | ours / plain, CPU '
          '| first loss ours | first loss plain | max loss difference |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for result in results:
        seconds = result['median_seconds']
        cpu_seconds = result['median_cpu_seconds']
        print(f'| {result["model"]} | {result["parameters"] / 1e6:.1f} | {seconds["ours"]:.3f} | '
              f'{seconds["plain"]:.3f} | {result["ratio"]:.3f} | {cpu_seconds["ours"]:.3f} | '
              f'{cpu_seconds["plain"]:.3f} | {result["cpu_ratio"]:.3f} | {result["losses"]["ours"][0]:.6f} | '
              f'{result["losses"]["plain"][0]:.6f} | {result["max_loss_difference"]:.1e} |')

    if args.out:
        write_summary(args.out, 'clip_step_vs_openclip', (load_before[0], load_after[0]), results, threads=torch.get_num_threads(),
                      steps=args.steps)
    return results


if __name__ == '__main__':
    main()
