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
from torch import nn
from torchmetrics import Metric

from composer_clip.fsdp2_utils import build_block_predicate
from composer_clip.metrics import InBatchAccuracy, RetrievalRecall
from composer_clip.multi_encoder_model import (
    MultiEncoderCLIP,
    MultiEncoderCLIPBase,
    MultiVisionCLIP,
    features_by_side,
)
from composer_clip.one_to_many_loss import FeatureAggregator, MultiEncoderClipLoss, OneToManyClipLoss

RECALL_KS = (1, 5, 10)
RECALL_DIRECTIONS = {'i2t': 'image_to_text', 't2i': 'text_to_image'}


class ComposerCLIP(ComposerModel):
    """ComposerModel around a multi-encoder CLIP model and its loss.

    Pairs: `MultiVisionCLIP` with `OneToManyClipLoss(text_to_multi_vision=True)`,
    `MultiTextCLIP` with `OneToManyClipLoss(text_to_multi_vision=False)` and
    `MultiEncoderCLIP` with `MultiEncoderClipLoss`.

    Batches are dictionaries with `images` and `texts` (each one tensor, or one per
    tower) and, for evaluation, `sample_index` (batch,).

    Metrics compare one side with the other side's aggregate (the loss's aggregation;
    the mean in the pairwise mode). They are reported for each vision tower `vision_i`
    when there are several, each text tower `text_j` when there are several, and for
    both aggregates, `aggregate`:

    - training: `in_batch_accuracy/<view>`, and the loss of each tower (or tower pair)
      as `loss/train/<tower>` when `log_tower_losses` is set;
    - evaluation: `i2t_recall@k/<view>` and `t2i_recall@k/<view>` for k in 1, 5, 10,
      over the whole evaluation set.
    """

    def __init__(self, model: MultiEncoderCLIPBase, loss_fn: nn.Module, log_tower_losses: bool = True):
        super().__init__()
        check_model_and_loss(model, loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        self.log_tower_losses = log_tower_losses

        # Composer's FSDP2 path shards each direct child of this wrapper and reads
        # `fsdp_wrap_fn` and `activation_checkpointing_fn` only from that child, so the model
        # carries the predicate too. The predicate stores the block modules themselves, so it
        # stays valid after sharding.
        self.block_predicate = build_block_predicate(model)
        model.fsdp_wrap_fn = self.block_predicate
        model.activation_checkpointing_fn = self.block_predicate
        # Evaluation calls the loss's aggregators outside the loss's forward. As FSDP2 units
        # of their own they gather their weights whenever they are called.
        loss_fn.fsdp_wrap_fn = is_feature_aggregator

        self.view_names = [f'vision_{i}' for i in range(model.num_vision_encoders) if model.num_vision_encoders > 1]
        self.view_names += [f'text_{j}' for j in range(model.num_text_encoders) if model.num_text_encoders > 1]
        self.view_names.append('aggregate')

        self.train_metrics = {
            f'in_batch_accuracy/{view}': tag_view(InBatchAccuracy(), view) for view in self.view_names
        }
        self.eval_metrics = {
            f'{short}_recall@{k}/{view}': tag_view(RetrievalRecall(k=k, direction=direction), view)
            for view in self.view_names
            for short, direction in RECALL_DIRECTIONS.items()
            for k in RECALL_KS
        }

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(batch['images'], batch['texts'])

    def loss(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        vision, text = features_by_side(self.model, outputs)
        logit_scale = outputs['logit_scale'] if isinstance(outputs, dict) else outputs[-1]
        output_dict = self.log_tower_losses

        if isinstance(self.loss_fn, MultiEncoderClipLoss):
            result = self.loss_fn(vision, text, logit_scale, output_dict=output_dict)
        elif self.loss_fn.text_to_multi_vision:
            result = self.loss_fn(text[0], vision, logit_scale, output_dict=output_dict)
        else:
            result = self.loss_fn(vision[0], text, logit_scale, output_dict=output_dict)
        return result if output_dict else {'total': result}

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, tuple]:
        """Return, for each metric view, the pair (image features, text features) it compares."""
        if outputs is None:
            outputs = self.forward(batch)
        vision, text = features_by_side(self.model, outputs)
        vision_aggregate, text_aggregate = self._aggregates(vision, text)

        views = {}
        if len(vision) > 1:
            views.update({f'vision_{i}': (features, text_aggregate) for i, features in enumerate(vision)})
        if len(text) > 1:
            views.update({f'text_{j}': (vision_aggregate, features) for j, features in enumerate(text)})
        views['aggregate'] = (vision_aggregate, text_aggregate)
        return views

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Return True for the modules that FSDP2 shards as units: the towers' repeated blocks."""
        return self.block_predicate(module)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Return True for the modules whose activations are checkpointed: the same blocks."""
        return self.block_predicate(module)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: dict[str, tuple], metric: Metric) -> None:
        image_features, text_features = outputs[self._view_of(metric)]
        if isinstance(metric, RetrievalRecall):
            metric.update(image_features, text_features, batch['sample_index'])
        else:
            metric.update(image_features, text_features)

    def _aggregates(self, vision: list[torch.Tensor], text: list[torch.Tensor]):
        if isinstance(self.loss_fn, MultiEncoderClipLoss):
            return self.loss_fn.aggregate_vision(vision), self.loss_fn.aggregate_text(text)
        if self.loss_fn.text_to_multi_vision:
            return self.loss_fn.aggregate(vision), text[0]
        return vision[0], self.loss_fn.aggregate(text)

    def _view_of(self, metric: Metric) -> str:
        view = getattr(metric, 'view', None)
        if view not in self.view_names:
            raise ValueError(f'metric {metric!r} was not created by this model; it names no view of it')
        return view


def is_feature_aggregator(module: nn.Module) -> bool:
    """Return True for the aggregators inside a loss."""
    return isinstance(module, FeatureAggregator)


def check_model_and_loss(model: MultiEncoderCLIPBase, loss_fn: nn.Module) -> None:
    """Raise unless `loss_fn` fits the model's kind and tower counts."""
    if isinstance(model, MultiEncoderCLIP):
        if not isinstance(loss_fn, MultiEncoderClipLoss):
            raise ValueError(f'MultiEncoderCLIP needs MultiEncoderClipLoss, got {type(loss_fn).__name__}')
        counts = (loss_fn.num_vision_encoders, loss_fn.num_text_encoders)
        if counts != (model.num_vision_encoders, model.num_text_encoders):
            raise ValueError(
                f'the model has {model.num_vision_encoders} vision and {model.num_text_encoders} text encoders '
                f'but the loss has num_vision_encoders={counts[0]} and num_text_encoders={counts[1]}; set them equal'
            )
        return

    if not isinstance(loss_fn, OneToManyClipLoss):
        raise ValueError(f'{type(model).__name__} needs OneToManyClipLoss, got {type(loss_fn).__name__}')
    multi_vision = isinstance(model, MultiVisionCLIP)
    if loss_fn.text_to_multi_vision != multi_vision:
        raise ValueError(
            f'{type(model).__name__} has several {"vision" if multi_vision else "text"} towers, but the loss has '
            f'text_to_multi_vision={loss_fn.text_to_multi_vision}; build OneToManyClipLoss('
            f'text_to_multi_vision={multi_vision})'
        )
    side, count = ('vision', model.num_vision_encoders) if multi_vision else ('text', model.num_text_encoders)
    if loss_fn.num_multi_encoders != count:
        raise ValueError(
            f'the model has {count} {side} encoders but the loss has '
            f'num_multi_encoders={loss_fn.num_multi_encoders}; set them equal'
        )


def tag_view(metric: Metric, view: str) -> Metric:
    """Record on `metric` which pair of features it measures.

    Composer deep-copies the metrics that `get_metrics` returns and passes the copies to
    `update_metric`, so the view travels as an attribute rather than by object identity.
    """
    metric.view = view
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
