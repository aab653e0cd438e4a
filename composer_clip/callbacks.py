"""Composer callbacks of composer_clip."""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from composer_clip.composer_model import num_samples_in_batch
from composer_clip.data.bad_samples import (
    BAD_SAMPLE_REASONS,
    BadSample,
    BadSampleCounts,
    check_max_bad_samples,
    exceeds_max_bad_samples,
)
from composer_clip.fsdp2_utils import log_fsdp2_memory_stats
from composer_clip.multi_encoder_model import MAX_LOGIT_SCALE

log = logging.getLogger(__name__)


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
    """Keep every `logit_scale` parameter within [0, ln(100)] after each optimizer step, and log it.

    CLIP caps the learned temperature at 100; without the cap it grows until the loss
    saturates. The models also cap the scale in `forward`, so a value above the cap gets
    no gradient, but clamping the stored parameter keeps checkpoints within range too.

    After clamping, the factor that multiplies the cosine similarities, exp(logit_scale),
    goes to Composer's loggers every batch as `logit_scale/exp`. With several
    `logit_scale` parameters, each is logged as `logit_scale/exp/<path of its module>`.
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        scales = {}
        for name, parameter in state.model.named_parameters():
            if name.rsplit('.', 1)[-1] != 'logit_scale':
                continue
            parameter.data.clamp_(0, MAX_LOGIT_SCALE)

            value = parameter.detach()
            if isinstance(value, DTensor):
                # FSDP2 keeps the value on one rank only. Every rank runs batch_end, so all
                # ranks take part in this all-gather.
                value = value.full_tensor()
            scales[name.rpartition('.')[0]] = value.reshape(-1)[0].exp().item()

        if len(scales) == 1:
            logger.log_metrics({'logit_scale/exp': next(iter(scales.values()))})
        elif scales:
            logger.log_metrics({f'logit_scale/exp/{owner}': scale for owner, scale in scales.items()})


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


class BadSampleMonitor(Callback):
    """Count the bad samples that the data loaders skipped, log them and enforce a limit.

    `StreamingImageTextDataset` replaces each bad sample with a good one and lists it in
    the batch under ``'bad_samples'``. This callback sums those lists over all ranks
    after every batch. Each bad sample is logged on the rank that read it: the first
    `log_limit` per epoch at WARNING, the rest at DEBUG. At each epoch end and evaluation
    end, the counts per reason go to the log and to the metrics
    ``bad_samples/<train|eval>/<reason>`` and ``bad_samples/<train|eval>/total``.
    Training counts add up over the run. Evaluation counts restart at each evaluation.

    Args:
        max_bad_samples: limit for the training data. None allows any number. An int is
            the number of bad samples allowed in the run (0 stops at the first). A float
            in (0, 1) is the allowed fraction of all samples read, checked once it allows
            at least one. Exceeding it raises an error that names the shard and index of
            this rank's latest bad sample.
        max_eval_bad_samples: the same limit for each evaluation.
        log_limit: number of bad samples per epoch and rank logged at WARNING.
    """

    def __init__(
        self,
        max_bad_samples: int | float | None = None,
        max_eval_bad_samples: int | float | None = None,
        log_limit: int = 10,
    ):
        check_max_bad_samples(max_bad_samples)
        check_max_bad_samples(max_eval_bad_samples)
        self.max_bad_samples = max_bad_samples
        self.max_eval_bad_samples = max_eval_bad_samples
        self.log_limit = log_limit
        self.train_counts = BadSampleCounts()
        self.epoch_counts = BadSampleCounts()
        self.eval_counts = BadSampleCounts()
        self._logged_this_epoch = 0
        self._latest_bad_sample: BadSample | None = None

    def state_dict(self) -> dict[str, Any]:
        return {'train_counts': self.train_counts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_counts.load_state_dict(state['train_counts'])

    def epoch_start(self, state: State, logger: Logger) -> None:
        self.epoch_counts = BadSampleCounts()
        self._logged_this_epoch = 0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        samples_read, by_reason = self._count_batch(state)
        self.train_counts.add(samples_read, by_reason)
        self.epoch_counts.add(samples_read, by_reason)
        if exceeds_max_bad_samples(self.train_counts, self.max_bad_samples):
            raise RuntimeError(self._limit_message('training', self.train_counts, self.max_bad_samples))

    def epoch_end(self, state: State, logger: Logger) -> None:
        epoch = int(state.timestamp.epoch)
        self._log_counts(f'Epoch {epoch}', self.epoch_counts, f'; {self.train_counts.bad} in the run so far')
        logger.log_metrics(_count_metrics('train', self.train_counts))

    def eval_start(self, state: State, logger: Logger) -> None:
        self.eval_counts = BadSampleCounts()

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        samples_read, by_reason = self._count_batch(state)
        self.eval_counts.add(samples_read, by_reason)
        if exceeds_max_bad_samples(self.eval_counts, self.max_eval_bad_samples):
            raise RuntimeError(self._limit_message('evaluation', self.eval_counts, self.max_eval_bad_samples))

    def eval_end(self, state: State, logger: Logger) -> None:
        self._log_counts(f'Evaluation {state.dataloader_label}', self.eval_counts, '')
        logger.log_metrics(_count_metrics('eval', self.eval_counts))

    def _count_batch(self, state: State) -> tuple[int, dict[str, int]]:
        """Return the samples read and the bad samples per reason in this batch, summed over ranks."""
        bad_samples = state.batch.get('bad_samples', []) if isinstance(state.batch, dict) else []
        for bad_sample in bad_samples:
            self._latest_bad_sample = bad_sample
            level = logging.WARNING if self._logged_this_epoch < self.log_limit else logging.DEBUG
            log.log(level, 'Skipped bad sample %d of %s (%s): %s', bad_sample.sample_index, bad_sample.shard,
                    bad_sample.reason, bad_sample.message)
            self._logged_this_epoch += 1

        # Each bad sample's place in the batch contains its replacement, so the batch size is
        # the number of dataset samples read, bad ones included.
        local = [num_samples_in_batch(state.batch)]
        local += [sum(bad.reason == reason for bad in bad_samples) for reason in BAD_SAMPLE_REASONS]
        totals = state.device.tensor_to_device(torch.tensor(local, dtype=torch.int64))
        dist.all_reduce(totals, reduce_operation='SUM')
        totals = totals.tolist()
        return totals[0], dict(zip(BAD_SAMPLE_REASONS, totals[1:]))

    def _log_counts(self, what: str, counts: BadSampleCounts, suffix: str) -> None:
        if counts.bad:
            log.warning('%s: skipped %d bad samples of %d read (%s)%s', what, counts.bad, counts.samples_read,
                        dict(sorted(counts.by_reason.items())), suffix)
        else:
            log.info('%s: no bad samples in %d read%s', what, counts.samples_read, suffix)

    def _limit_message(self, what: str, counts: BadSampleCounts, limit: int | float) -> str:
        if self._latest_bad_sample is None:
            latest = 'This rank read none of them; the logs of the other ranks name them.'
        else:
            bad = self._latest_bad_sample
            latest = f'The latest on this rank is sample {bad.sample_index} of shard {bad.shard} ({bad.reason}: {bad.message}).'
        return (
            f'{counts.bad} bad samples of {counts.samples_read} read during {what} exceed max_bad_samples={limit} '
            f'({dict(sorted(counts.by_reason.items()))}). {latest} Fix or rewrite the shards (write_image_text_mds '
            f'skips bad samples), or raise max_bad_samples in the loader config.'
        )


def _count_metrics(split: str, counts: BadSampleCounts) -> dict[str, int]:
    metrics = {f'bad_samples/{split}/{reason}': counts.by_reason.get(reason, 0) for reason in BAD_SAMPLE_REASONS}
    metrics[f'bad_samples/{split}/total'] = counts.bad
    return metrics
