"""Composer wrapper for the multi-encoder CLIP models.

The wrapper's direct children are the model and the loss, so that Composer's optimizer,
DDP and FSDP2 see every trainable parameter: the towers, `logit_scale` and learnable
aggregation weights.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.core import DataSpec
from composer.models import ComposerModel
from torchmetrics import Metric

from composer_clip.metrics import InBatchAccuracy, RetrievalRecall
from composer_clip.multi_encoder_model import MultiVisionCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss

RECALL_KS = (1, 5, 10)
RECALL_DIRECTIONS = {'i2t': 'image_to_text', 't2i': 'text_to_image'}


class ComposerCLIP(ComposerModel):
    """ComposerModel around a `MultiVisionCLIP` and its `OneToManyClipLoss`.

    Batches are dictionaries with `images` (one tensor, or one per vision tower), `texts`
    (one tensor, or a one-element list) and, for evaluation, `sample_index` (batch,).

    Metrics, per vision tower (`vision_0`, `vision_1`, ...) and for the aggregate of the
    towers as the loss aggregates them (`aggregate`):

    - training: `in_batch_accuracy/<tower>`;
    - evaluation: `i2t_recall@k/<tower>` and `t2i_recall@k/<tower>` for k in 1, 5, 10,
      over the whole evaluation set.
    """

    def __init__(self, model: MultiVisionCLIP, loss_fn: OneToManyClipLoss):
        super().__init__()
        if not loss_fn.text_to_multi_vision:
            raise ValueError(
                'MultiVisionCLIP has one text tower and several vision towers, but the loss has '
                'text_to_multi_vision=False; build OneToManyClipLoss(text_to_multi_vision=True)'
            )
        if loss_fn.num_multi_encoders != model.num_vision_encoders:
            raise ValueError(
                f'the model has {model.num_vision_encoders} vision encoders but the loss has '
                f'num_multi_encoders={loss_fn.num_multi_encoders}; set them equal'
            )
        self.model = model
        self.loss_fn = loss_fn
        self.tower_names = [f'vision_{index}' for index in range(model.num_vision_encoders)] + ['aggregate']

        self.train_metrics = {
            f'in_batch_accuracy/{tower}': tag_tower(InBatchAccuracy(), tower) for tower in self.tower_names
        }
        self.eval_metrics = {
            f'{short}_recall@{k}/{tower}': tag_tower(RetrievalRecall(k=k, direction=direction), tower)
            for tower in self.tower_names
            for short, direction in RECALL_DIRECTIONS.items()
            for k in RECALL_KS
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model(batch['images'], batch['texts'])

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(outputs['text_features'], outputs['vision_features_list'], outputs['logit_scale'])

    def eval_forward(self, batch: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        if outputs is None:
            outputs = self.forward(batch)
        vision_features = list(outputs['vision_features_list'])
        vision_features.append(self.loss_fn.aggregate(vision_features))
        return {'text_features': outputs['text_features'], 'vision_features_per_tower': vision_features}

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: dict[str, Any], metric: Metric) -> None:
        tower_index = self.tower_names.index(self._tower_of(metric))
        image_features = outputs['vision_features_per_tower'][tower_index]
        text_features = outputs['text_features']

        if isinstance(metric, RetrievalRecall):
            metric.update(image_features, text_features, batch['sample_index'])
        else:
            metric.update(image_features, text_features)

    def _tower_of(self, metric: Metric) -> str:
        tower = getattr(metric, 'tower', None)
        if tower not in self.tower_names:
            raise ValueError(f'metric {metric!r} was not created by this model; it names no tower of it')
        return tower


def tag_tower(metric: Metric, tower: str) -> Metric:
    """Record on `metric` which tower's features it measures.

    Composer deep-copies the metrics that `get_metrics` returns and passes the copies to
    `update_metric`, so the tower travels as an attribute rather than by object identity.
    """
    metric.tower = tower
    return metric


def num_samples_in_batch(batch: dict[str, Any]) -> int:
    """Return the number of image-text pairs in a batch."""
    images = batch['images']
    return (images if isinstance(images, torch.Tensor) else images[0]).shape[0]


def split_batch(batch: dict[str, Any], microbatch_size: int) -> list[dict[str, Any]]:
    """Return the batch as a single microbatch; reject real splits.

    Splitting a device batch into microbatches would shrink the set of negatives that
    each sample is contrasted with, and so change the loss. Set
    `device_train_microbatch_size` to the device batch size.
    """
    batch_size = num_samples_in_batch(batch)
    if microbatch_size < batch_size:
        raise ValueError(
            f'microbatch size {microbatch_size} is smaller than the device batch size {batch_size}; contrastive '
            f'losses need the whole batch at once, so set device_train_microbatch_size={batch_size}'
        )
    return [batch]


def clip_data_spec(dataloader) -> DataSpec:
    """Wrap an image-text dataloader for Composer, with batch counting and no microbatch splits."""
    return DataSpec(dataloader, get_num_samples_in_batch=num_samples_in_batch, split_batch=split_batch)
