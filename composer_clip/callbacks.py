"""Composer callbacks of composer_clip."""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_clip.fsdp2_utils import log_fsdp2_memory_stats
from composer_clip.multi_encoder_model import MAX_LOGIT_SCALE


class StopOnNonFiniteLoss(Callback):
    """Stop training with an error when the loss is NaN or infinite.

    The check runs right after the loss is computed, before the backward pass and the
    optimizer step, so neither the weights nor a checkpoint ever take the non-finite state.
    """

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss['total'] if isinstance(state.loss, dict) else state.loss
        if not torch.isfinite(loss).all():
            raise RuntimeError(
                f'the loss is {loss.detach().flatten()[0].item()} at batch {int(state.timestamp.batch) + 1} '
                f'(epoch {int(state.timestamp.epoch)}); training stopped before the optimizer step. Look for '
                f'inf or NaN inputs, lower the learning rate, or check logit_scale'
            )


class ClampLogitScale(Callback):
    """Keep every `logit_scale` parameter within [0, ln(100)] after each optimizer step.

    CLIP caps the learned temperature at 100; without the cap it grows until the loss
    saturates. The models also cap the scale in `forward`, so a value above the cap gets
    no gradient, but clamping the stored parameter keeps checkpoints within range too.
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        for name, parameter in state.model.named_parameters():
            if name.rsplit('.', 1)[-1] == 'logit_scale':
                parameter.data.clamp_(0, MAX_LOGIT_SCALE)


class MemoryMonitor(Callback):
    """Log device memory (process memory on the CPU) every `interval` batches.

    Calls `fsdp2_utils.log_fsdp2_memory_stats` on every rank, so each rank's numbers go
    to Composer's loggers as `memory/rank<r>/<stat>_gib` and to the Python log of rank 0.

    Args:
        interval: number of batches between two measurements.
    """

    def __init__(self, interval: int = 100):
        if interval < 1:
            raise ValueError(f'interval={interval} must be at least 1 batch')
        self.interval = interval

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval != 0:
            return
        rank = dist.get_global_rank()
        stats = log_fsdp2_memory_stats(rank=0)
        logger.log_metrics({
            f'memory/rank{rank}/{name[:-len("_bytes")]}_gib': value / 2**30
            for name, value in stats.items()
            if value is not None
        })
