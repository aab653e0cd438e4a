"""Step time of a Composer Trainer over ComposerCLIP against a hand-written loop.

Both sides train a copy of the same MultiVisionCLIP, one OpenCLIP ViT tower and
OpenCLIP's text tower as in clip_step_vs_openclip.py, with `OneToManyClipLoss`. They use
AdamW with the parameter groups of `builders.build_optimizer` and run on the CPU in
fp32. A `torch.utils.data.DataLoader` serves both the same in-memory batches in the
same order.

- trainer: `composer.Trainer` over `ComposerCLIP(model, loss)` with the settings of
  `builders.build_trainer`: one microbatch per batch, `clip_data_spec`, and the callbacks
  StopOnNonFiniteLoss, ClampLogitScale, LRMonitor, SpeedMonitor and MemoryMonitor. It
  runs no evaluation, saves no checkpoint, shows no progress bar and has no scheduler, so
  the learning rate is constant on both sides. The training metrics of ComposerCLIP
  (in-batch accuracy) and the logged per-tower loss are computed, as in a real run.
- loop: next batch from the DataLoader, move it to the device, forward, loss, backward,
  optimizer step, zero the gradients, clamp `logit_scale`, read the loss value.

A callback times the trainer's step from Event.BEFORE_DATALOADER to
Event.BATCH_CHECKPOINT, which spans everything the Trainer does per batch, data
loading included. The same callback runs one loop step next to each trainer step:
after it on even steps, before it on odd steps, so that changes in machine load reach
both sides alike. Both start from the same weights and see the same batches, so their
losses agree step by step up to rounding. The script reports the median wall-clock time
and the median CPU time of the process per step. On a machine shared with other work,
the CPU time with `--threads 1` is the steadier figure.

    python scripts/benchmarks/trainer_vs_loop.py
    python scripts/benchmarks/trainer_vs_loop.py --models tiny small --threads 1 --out trainer.json
    python scripts/benchmarks/trainer_vs_loop.py --quick
"""

import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import write_summary  # noqa: E402
from clip_step_vs_openclip import (  # noqa: E402
    build_pair,
    parse_step_arguments,
    register_extra_configs,
    synthetic_batches,
)
from composer.callbacks import LRMonitor, SpeedMonitor  # noqa: E402

from composer_clip.builders import build_optimizer  # noqa: E402
from composer_clip.callbacks import ClampLogitScale, MemoryMonitor, StopOnNonFiniteLoss  # noqa: E402
from composer_clip.composer_model import ComposerCLIP, clip_data_spec  # noqa: E402
from composer_clip.one_to_many_loss import OneToManyClipLoss  # noqa: E402

OPTIMIZER_CONFIG = OmegaConf.create({
    'optimizer': {'name': 'adamw', 'lr': 5e-4, 'weight_decay': 0.2, 'betas': [0.9, 0.98], 'eps': 1e-6},
})


class InMemoryPairs(Dataset):
    """Image-text pairs held in memory, served as `{'images': (3, H, W), 'texts': (context_length,)}`."""

    def __init__(self, batches):
        self.images = torch.cat([images for images, _ in batches])
        self.texts = torch.cat([texts for _, texts in batches])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {'images': self.images[index], 'texts': self.texts[index]}


class HandWrittenLoop:
    """The training loop that the Trainer replaces, one step per call."""

    def __init__(self, model, loss_fn, dataloader, device: torch.device):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = build_optimizer(OPTIMIZER_CONFIG, model)
        self.batches = iter(dataloader)
        self.device = device

    def step(self) -> float:
        batch = next(self.batches)
        images = batch['images'].to(self.device, non_blocking=True)
        texts = batch['texts'].to(self.device, non_blocking=True)

        outputs = self.model(images, texts)
        loss = self.loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        return loss.item()


class InterleavedTimer(Callback):
    """Time each Trainer step and run one loop step next to it, alternating which goes first."""

    def __init__(self, loop: HandWrittenLoop):
        self.loop = loop
        # Wall-clock and CPU seconds of each step, keyed 'trainer' and 'loop'.
        self.seconds: dict[str, list[float]] = {'trainer': [], 'loop': []}
        self.cpu_seconds: dict[str, list[float]] = {'trainer': [], 'loop': []}
        self.losses: dict[str, list[float]] = {'trainer': [], 'loop': []}
        self._start = (0.0, 0.0)

    def _record(self, side: str, start: tuple[float, float]) -> None:
        self.seconds[side].append(time.perf_counter() - start[0])
        self.cpu_seconds[side].append(time.process_time() - start[1])

    def _run_loop_step(self) -> None:
        start = (time.perf_counter(), time.process_time())
        self.losses['loop'].append(self.loop.step())
        self._record('loop', start)

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        step = len(self.seconds['trainer'])
        if event == Event.BEFORE_DATALOADER:
            if step % 2 == 1:
                self._run_loop_step()
            self._start = (time.perf_counter(), time.process_time())
        elif event == Event.BATCH_END:
            self.losses['trainer'].append(float(state.total_loss_dict['loss/train/total']))
        elif event == Event.BATCH_CHECKPOINT:
            self._record('trainer', self._start)
            if step % 2 == 0:
                self._run_loop_step()


def measure(model_name: str, steps: int, warmup: int, batch_size: int, folder: str) -> dict:
    """Train both sides for `warmup + steps` interleaved steps; return medians and losses."""
    _, model, tokenizer, image_size, _ = build_pair(model_name, folder)
    num_batches = warmup + steps
    dataset = InMemoryPairs(synthetic_batches(tokenizer, image_size, num_batches, batch_size))

    # Both sides get a copy, so that their parameters have the same allocation history. With the
    # original on one side and a copy on the other, the copy's side ran about 2% slower on the CPU.
    trainer_model, loop_model = copy.deepcopy(model), copy.deepcopy(model)
    del model
    loop = HandWrittenLoop(
        loop_model,
        OneToManyClipLoss(num_multi_encoders=1),
        DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True),
        torch.device('cpu'),
    )
    timer = InterleavedTimer(loop)

    composer_model = ComposerCLIP(trainer_model, OneToManyClipLoss(num_multi_encoders=1))
    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec(DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)),
        max_duration=f'{num_batches}ba',
        optimizers=build_optimizer(OPTIMIZER_CONFIG, composer_model),
        device_train_microbatch_size=batch_size,
        precision='fp32',
        device='cpu',
        seed=0,
        callbacks=[
            StopOnNonFiniteLoss(),
            ClampLogitScale(),
            LRMonitor(),
            SpeedMonitor(window_size=10),
            MemoryMonitor(interval=50),
            timer,
        ],
        loggers=[],
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()

    medians = {side: statistics.median(values[warmup:]) for side, values in timer.seconds.items()}
    cpu_medians = {side: statistics.median(values[warmup:]) for side, values in timer.cpu_seconds.items()}
    loss_differences = [abs(a - b) for a, b in zip(timer.losses['trainer'], timer.losses['loop'])]
    return {
        'model': model_name,
        'batch_size': batch_size,
        'median_seconds': medians,
        'median_cpu_seconds': cpu_medians,
        'ratio': medians['trainer'] / medians['loop'],
        'cpu_ratio': cpu_medians['trainer'] / cpu_medians['loop'],
        'overhead_ms': (medians['trainer'] - medians['loop']) * 1000,
        'cpu_overhead_ms': (cpu_medians['trainer'] - cpu_medians['loop']) * 1000,
        'losses': timer.losses,
        'first_loss_difference': loss_differences[0],
        'max_loss_difference': max(loss_differences),
    }


def main(argv=None):
    args = parse_step_arguments(argv, __doc__)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        register_extra_configs(folder)
        results = [measure(model, args.steps, args.warmup, args.batch_size, folder) for model in args.models]
    load_after = os.getloadavg()

    print(f'fp32 on the CPU, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, '
          f'torch {torch.__version__}, '
          f'median of {args.steps} steps after {args.warmup} warm-up, '
          f'load average {load_before[0]:.2f} before and {load_after[0]:.2f} after')
    print('| model | trainer s | loop s | trainer / loop | difference ms | trainer CPU s | loop CPU s '
          '| trainer / loop, CPU | difference CPU ms | first loss trainer | first loss loop | max loss difference |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for result in results:
        seconds = result['median_seconds']
        cpu_seconds = result['median_cpu_seconds']
        print(f'| {result["model"]} | {seconds["trainer"]:.3f} | {seconds["loop"]:.3f} | {result["ratio"]:.3f} | '
              f'{result["overhead_ms"]:.1f} | {cpu_seconds["trainer"]:.3f} | {cpu_seconds["loop"]:.3f} | '
              f'{result["cpu_ratio"]:.3f} | {result["cpu_overhead_ms"]:.1f} | {result["losses"]["trainer"][0]:.6f} | '
              f'{result["losses"]["loop"][0]:.6f} | {result["max_loss_difference"]:.1e} |')

    if args.out:
        write_summary(args.out, 'trainer_vs_loop', (load_before[0], load_after[0]), results, threads=torch.get_num_threads(),
                      steps=args.steps)
    return results


if __name__ == '__main__':
    main()
