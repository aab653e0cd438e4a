"""Contrastive losses between one anchor encoder and several encoders on the other side.

Every loss here is exact under data parallelism. With W ranks of local batch b, the
value on each rank equals the single-process loss over the global batch of W * b
samples. The mean over ranks of each rank's gradient, which DDP and FSDP2 apply,
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

AGGREGATIONS = ('mean', 'max', 'weighted', 'pairwise')

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

    if world_size == 1:
        return local_loss

    # The global loss is the mean of the ranks' local losses. Report that value, but keep the
    # gradient of the local part: the gather's backward already collects the other ranks' terms.
    global_loss = mean_over_ranks(local_loss.detach(), world_size)
    return local_loss + (global_loss - local_loss.detach())


class FeatureAggregator(nn.Module):
    """Combine the features of N towers into one normalised (batch, dim) tensor per sample.

    Args:
        num_encoders: N, the number of feature tensors to combine.
        aggregation: 'mean' (average), 'max' (element-wise maximum), 'weighted'
            (softmax-normalised weights over the towers) or 'pairwise'. The pairwise loss
            never combines features; its aggregate, used for evaluation, is the mean.
        learnable_weights: with 'weighted', learn the weights (initialised uniform);
            otherwise they stay uniform.
    """

    def __init__(self, num_encoders: int, aggregation: str = 'mean', learnable_weights: bool = False):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f'aggregation={aggregation!r} is not supported; pass one of {AGGREGATIONS}')
        if num_encoders < 1:
            raise ValueError(f'the number of encoders is {num_encoders}; it must be at least 1')
        if learnable_weights and aggregation != 'weighted':
            raise ValueError(
                f"learnable_weights=True needs aggregation='weighted', got aggregation={aggregation!r}"
            )

        self.num_encoders = num_encoders
        self.aggregation = aggregation
        self.learnable_weights = learnable_weights

        # Zero logits give uniform softmax weights.
        weight_logits = torch.zeros(num_encoders)
        if learnable_weights:
            self.weight_logits = nn.Parameter(weight_logits)
        else:
            self.register_buffer('weight_logits', weight_logits, persistent=False)

    def weights(self) -> torch.Tensor:
        """Return the (N,) softmax weights of the 'weighted' aggregation."""
        return torch.softmax(self.weight_logits, dim=0)

    def forward(self, features_list: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(features_list), dim=0)

        if self.aggregation == 'max':
            aggregated = stacked.max(dim=0).values
        elif self.aggregation == 'weighted':
            aggregated = torch.einsum('n,nbd->bd', self.weights().to(stacked.dtype), stacked)
        else:
            aggregated = stacked.mean(dim=0)

        return F.normalize(aggregated, dim=-1)


def check_num_features(features_list: Sequence[torch.Tensor], expected: int, argument: str) -> None:
    """Raise unless `features_list` is a sequence of `expected` tensors."""
    if isinstance(features_list, torch.Tensor):
        count = 'a single tensor was'
    elif len(features_list) != expected:
        count = f'{len(features_list)} tensors were'
    else:
        return
    raise ValueError(
        f'{argument}={expected} but {count} passed; pass a list with one (batch, dim) feature tensor per encoder'
    )


class OneToManyClipLoss(nn.Module):
    """Contrastive loss between one anchor tower and N towers on the other side.

    With 'mean', 'max' or 'weighted' aggregation, the N feature tensors are combined
    into one, re-normalised, and contrasted with the anchor by the symmetric CLIP loss.
    With 'pairwise', the loss is the mean of the N symmetric losses between the anchor
    and each tower. With N = 1 and no learnable weights, every aggregation leaves the
    single tower's features as they are (they are normalised already), so the loss is
    computed as `open_clip.loss.ClipLoss` computes it.

    Args:
        text_to_multi_vision: True when the anchor is the text side and the N towers are
            vision towers; False for one vision tower against N text towers. The loss is
            symmetric, so this only names the towers in the per-tower terms.
        num_multi_encoders: N, the number of feature tensors `forward` expects.
        aggregation: 'mean', 'max', 'weighted' or 'pairwise' (see `FeatureAggregator`).
        learnable_weights: with 'weighted', learn the weights (initialised uniform).
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
        if num_multi_encoders < 1:
            raise ValueError(f'num_multi_encoders={num_multi_encoders} must be at least 1')
        self.aggregator = FeatureAggregator(num_multi_encoders, aggregation, learnable_weights)
        self.text_to_multi_vision = text_to_multi_vision
        self.num_multi_encoders = num_multi_encoders
        self.aggregation = aggregation
        self.rank = rank
        self.world_size = world_size

        side = 'vision' if text_to_multi_vision else 'text'
        self.tower_names = [f'{side}_{index}' for index in range(num_multi_encoders)]

    def aggregate(self, features_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Aggregate N feature tensors (batch, dim) into one normalised (batch, dim) tensor."""
        check_num_features(features_list, self.num_multi_encoders, 'num_multi_encoders')
        return self.aggregator(features_list)

    def forward(
        self,
        anchor_features: torch.Tensor,
        multi_features_list: Sequence[torch.Tensor],
        logit_scale: torch.Tensor,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            anchor_features: (batch, dim) normalised features of the anchor tower.
            multi_features_list: N tensors (batch, dim), normalised features of each tower.
            logit_scale: scalar, already exponentiated.
            output_dict: also return the contrastive loss of the anchor against each tower
                alone, keyed `vision_0`, `vision_1`, ... (or `text_i`). They carry gradients
                only in the pairwise mode, where the loss is their mean.

        Returns:
            The scalar loss over the global batch, or with `output_dict` a dictionary with
            the loss under 'total' and one entry per tower.
        """
        check_num_features(multi_features_list, self.num_multi_encoders, 'num_multi_encoders')

        def loss_against(features):
            return symmetric_contrastive_loss(anchor_features, features, logit_scale, self.rank, self.world_size)

        if self.aggregation == 'pairwise':
            terms = [loss_against(features) for features in multi_features_list]
            total = torch.stack(terms).mean()
        elif self._aggregate_is_identity():
            # Averaging or re-normalising one normalised tensor changes nothing except the run time.
            # On the CPU it added 7 to 12% to the loss's forward and backward at batch 256 to 2048
            # (scripts/benchmarks/loss_vs_clip_loss.py).
            total = loss_against(multi_features_list[0])
            terms = [total.detach()]
        else:
            total = loss_against(self.aggregate(multi_features_list))
            if output_dict:
                with torch.no_grad():
                    terms = [loss_against(features) for features in multi_features_list]

        if not output_dict:
            return total
        return {'total': total, **dict(zip(self.tower_names, terms))}

    def _aggregate_is_identity(self) -> bool:
        """Return True when the aggregate of the normalised features is the single tower's features."""
        return self.num_multi_encoders == 1 and not self.aggregator.learnable_weights


class MultiEncoderClipLoss(nn.Module):
    """Contrastive loss between M vision towers and N text towers.

    With 'mean', 'max' or 'weighted' aggregation, each side's towers are combined into
    one normalised feature tensor and the two are contrasted by the symmetric CLIP loss.
    With 'pairwise', the loss is the mean of the M * N symmetric losses between every
    vision tower and every text tower. With M = N = 1 and 'mean' it equals
    `open_clip.loss.ClipLoss`.

    Args:
        num_vision_encoders: M.
        num_text_encoders: N.
        aggregation: 'mean', 'max', 'weighted' or 'pairwise' (see `FeatureAggregator`).
        learnable_weights: with 'weighted', learn one set of weights per side.
        rank, world_size: position of this process in the data-parallel group.
    """

    def __init__(
        self,
        num_vision_encoders: int,
        num_text_encoders: int,
        aggregation: str = 'mean',
        learnable_weights: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if num_vision_encoders < 1 or num_text_encoders < 1:
            raise ValueError(
                f'num_vision_encoders={num_vision_encoders} and num_text_encoders={num_text_encoders}; '
                f'both must be at least 1'
            )
        self.vision_aggregator = FeatureAggregator(num_vision_encoders, aggregation, learnable_weights)
        self.text_aggregator = FeatureAggregator(num_text_encoders, aggregation, learnable_weights)
        self.num_vision_encoders = num_vision_encoders
        self.num_text_encoders = num_text_encoders
        self.aggregation = aggregation
        self.rank = rank
        self.world_size = world_size
        self.pair_names = [
            f'vision_{i}_text_{j}' for i in range(num_vision_encoders) for j in range(num_text_encoders)
        ]

    def aggregate_vision(self, features_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Aggregate the M vision feature tensors into one normalised (batch, dim) tensor."""
        check_num_features(features_list, self.num_vision_encoders, 'num_vision_encoders')
        return self.vision_aggregator(features_list)

    def aggregate_text(self, features_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Aggregate the N text feature tensors into one normalised (batch, dim) tensor."""
        check_num_features(features_list, self.num_text_encoders, 'num_text_encoders')
        return self.text_aggregator(features_list)

    def forward(
        self,
        vision_features_list: Sequence[torch.Tensor],
        text_features_list: Sequence[torch.Tensor],
        logit_scale: torch.Tensor,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            vision_features_list: M tensors (batch, dim), normalised features of each vision tower.
            text_features_list: N tensors (batch, dim), normalised features of each text tower.
            logit_scale: scalar, already exponentiated.
            output_dict: also return the loss of every vision-text tower pair, keyed
                `vision_i_text_j`. They carry gradients only in the pairwise mode.

        Returns:
            The scalar loss over the global batch, or with `output_dict` a dictionary with
            the loss under 'total' and one entry per tower pair.
        """
        check_num_features(vision_features_list, self.num_vision_encoders, 'num_vision_encoders')
        check_num_features(text_features_list, self.num_text_encoders, 'num_text_encoders')

        def pair_terms():
            return [
                symmetric_contrastive_loss(vision, text, logit_scale, self.rank, self.world_size)
                for vision in vision_features_list
                for text in text_features_list
            ]

        if self.aggregation == 'pairwise':
            terms = pair_terms()
            total = torch.stack(terms).mean()
        else:
            vision = self.aggregate_vision(vision_features_list)
            text = self.aggregate_text(text_features_list)
            total = symmetric_contrastive_loss(vision, text, logit_scale, self.rank, self.world_size)
            if output_dict:
                with torch.no_grad():
                    terms = pair_terms()

        if not output_dict:
            return total
        return {'total': total, **dict(zip(self.pair_names, terms))}
