"""Contrastive losses between one anchor encoder and several encoders on the other side.

Every loss here is exact under data parallelism: with W ranks of local batch b, the
value on each rank equals the single-process loss over the global batch of W * b
samples, and the mean over ranks of each rank's gradient (what DDP and FSDP2 apply)
equals the single-process gradient.

How: each rank gathers the features of all ranks with autograd, computes only its own
rows of the (b, W * b) logit matrices, and the gather's backward sums the gradients
that the other ranks' rows send to this rank's features. The reported value is the
mean of the ranks' partial losses; the gradient stays that of this rank's part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

AGGREGATIONS = ('mean', 'max', 'weighted')


def gather_features(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `features` (batch, dim) of every rank in rank order, keeping autograd."""
    if world_size == 1:
        return features
    return torch.cat(dist_nn.all_gather(features), dim=0)


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Return the mean of a detached scalar over all ranks."""
    if world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size


def symmetric_contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Compute the CLIP loss between paired, normalised features of two sides.

    Args:
        features_a: (batch, dim) local features of one side.
        features_b: (batch, dim) local features of the other side; row i pairs with row i of `features_a`.
        logit_scale: scalar, already exponentiated.
        rank, world_size: position of this process in the data-parallel group.

    Returns:
        The global-batch loss: the mean of the a-to-b and b-to-a cross-entropies.
    """
    all_a = gather_features(features_a, world_size)
    all_b = gather_features(features_b, world_size)

    logits_a_to_b = logit_scale * features_a @ all_b.T
    logits_b_to_a = logit_scale * features_b @ all_a.T

    local_batch = features_a.shape[0]
    labels = torch.arange(local_batch, device=features_a.device) + rank * local_batch
    local_loss = (F.cross_entropy(logits_a_to_b, labels) + F.cross_entropy(logits_b_to_a, labels)) / 2

    # The global loss is the mean of the ranks' local losses. Report that value, but keep the
    # gradient of the local part: the gather's backward already collects the other ranks' terms.
    global_loss = mean_over_ranks(local_loss.detach(), world_size)
    return local_loss + (global_loss - local_loss.detach())


class OneToManyClipLoss(nn.Module):
    """Contrastive loss between one anchor tower and N towers on the other side.

    The N feature tensors are aggregated into one, re-normalised, and contrasted with the
    anchor by the symmetric CLIP loss. With N = 1 and `aggregation='mean'` the loss equals
    `open_clip.loss.ClipLoss`.

    Args:
        text_to_multi_vision: True when the anchor is the text side and the N towers are
            vision towers; False for one vision tower against N text towers. Only the
            argument order of `forward` depends on it: the loss is symmetric.
        num_multi_encoders: N, the number of feature tensors `forward` expects.
        aggregation: 'mean' (average of the N features), 'max' (element-wise maximum) or
            'weighted' (softmax-normalised weights over the N towers).
        learnable_weights: with 'weighted', learn the weights (initialised uniform);
            otherwise they stay uniform.
        rank, world_size: position of this process in the data-parallel group.
    """

    def __init__(
        self,
        text_to_multi_vision: bool = True,
        num_multi_encoders: int = 2,
        aggregation: str = 'mean',
        learnable_weights: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f'aggregation={aggregation!r} is not supported; pass one of {AGGREGATIONS}')
        if num_multi_encoders < 1:
            raise ValueError(f'num_multi_encoders={num_multi_encoders} must be at least 1')
        if learnable_weights and aggregation != 'weighted':
            raise ValueError(
                f"learnable_weights=True needs aggregation='weighted', got aggregation={aggregation!r}"
            )

        self.text_to_multi_vision = text_to_multi_vision
        self.num_multi_encoders = num_multi_encoders
        self.aggregation = aggregation
        self.learnable_weights = learnable_weights
        self.rank = rank
        self.world_size = world_size

        # Zero logits give uniform softmax weights.
        weight_logits = torch.zeros(num_multi_encoders)
        if learnable_weights:
            self.weight_logits = nn.Parameter(weight_logits)
        else:
            self.register_buffer('weight_logits', weight_logits, persistent=False)

    def aggregation_weights(self) -> torch.Tensor:
        """Return the (N,) softmax weights of the 'weighted' aggregation."""
        return torch.softmax(self.weight_logits, dim=0)

    def aggregate(self, features_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Aggregate N feature tensors (batch, dim) into one normalised (batch, dim) tensor."""
        self._check_num_features(features_list)
        stacked = torch.stack(list(features_list), dim=0)

        if self.aggregation == 'mean':
            aggregated = stacked.mean(dim=0)
        elif self.aggregation == 'max':
            aggregated = stacked.max(dim=0).values
        else:
            weights = self.aggregation_weights().to(stacked.dtype)
            aggregated = torch.einsum('n,nbd->bd', weights, stacked)

        return F.normalize(aggregated, dim=-1)

    def forward(
        self,
        anchor_features: torch.Tensor,
        multi_features_list: Sequence[torch.Tensor],
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            anchor_features: (batch, dim) normalised features of the anchor tower.
            multi_features_list: N tensors (batch, dim), normalised features of each tower.
            logit_scale: scalar, already exponentiated.

        Returns:
            Scalar loss over the global batch.
        """
        aggregated = self.aggregate(multi_features_list)
        return symmetric_contrastive_loss(anchor_features, aggregated, logit_scale, self.rank, self.world_size)

    def _check_num_features(self, features_list: Sequence[torch.Tensor]) -> None:
        if isinstance(features_list, torch.Tensor) or len(features_list) != self.num_multi_encoders:
            count = 'a single tensor' if isinstance(features_list, torch.Tensor) else f'{len(features_list)} tensors'
            raise ValueError(
                f'num_multi_encoders={self.num_multi_encoders} but {count} were passed; '
                f'pass a list with one (batch, dim) feature tensor per encoder'
            )

