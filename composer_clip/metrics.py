"""Retrieval metrics for contrastive image-text models, as torchmetrics `Metric`s.

Both metrics take normalised (batch, dim) image and text features where row i of one
side pairs with row i of the other.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

DIRECTIONS = ('image_to_text', 'text_to_image')


class InBatchAccuracy(Metric):
    """Fraction of samples whose pair is the nearest neighbour within its local batch.

    Averages the image-to-text and text-to-image directions. It is cheap enough to compute
    on every training batch. It depends on the batch size, so compare it only between
    runs of the same device batch size.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state('correct', default=torch.tensor(0.0), dist_reduce_fx='sum')
        self.add_state('total', default=torch.tensor(0.0), dist_reduce_fx='sum')

    def update(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        similarity = image_features @ text_features.T
        targets = torch.arange(similarity.shape[0], device=similarity.device)
        image_to_text = (similarity.argmax(dim=1) == targets).sum()
        text_to_image = (similarity.argmax(dim=0) == targets).sum()

        self.correct += (image_to_text + text_to_image).float()
        self.total += 2 * similarity.shape[0]

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class RetrievalRecall(Metric):
    """Recall@k of image-to-text or text-to-image retrieval over a whole evaluation set.

    Features of every batch (and every rank) are kept until `compute`, which ranks each
    query against all candidates of the set. `sample_index` identifies samples, so that
    the duplicates a distributed sampler adds to even out ranks are counted once.

    Args:
        k: a query counts as retrieved when its pair is among the k most similar candidates.
        direction: 'image_to_text' or 'text_to_image'.
    """

    full_state_update = False

    def __init__(self, k: int = 1, direction: str = 'image_to_text', **kwargs):
        super().__init__(**kwargs)
        if direction not in DIRECTIONS:
            raise ValueError(f'direction={direction!r} is not supported; pass one of {DIRECTIONS}')
        if k < 1:
            raise ValueError(f'k={k} must be at least 1')

        self.k = k
        self.direction = direction
        # NOTE: each RetrievalRecall instance stores its own copy of the features, so
        # N metrics over one tower hold N copies. Evaluation sets of retrieval benchmarks
        # (thousands of pairs) stay small enough for that.
        self.add_state('image_features', default=[], dist_reduce_fx='cat')
        self.add_state('text_features', default=[], dist_reduce_fx='cat')
        self.add_state('sample_index', default=[], dist_reduce_fx='cat')

    def update(self, image_features: torch.Tensor, text_features: torch.Tensor, sample_index: torch.Tensor) -> None:
        self.image_features.append(image_features.detach().float())
        self.text_features.append(text_features.detach().float())
        self.sample_index.append(sample_index.detach().long())

    def compute(self) -> torch.Tensor:
        image_features = _concat(self.image_features)
        text_features = _concat(self.text_features)
        sample_index = _concat(self.sample_index)

        keep = first_occurrences(sample_index)
        image_features = image_features[keep]
        text_features = text_features[keep]

        if self.direction == 'image_to_text':
            similarity = image_features @ text_features.T
        else:
            similarity = text_features @ image_features.T
        return recall_at_k(similarity, self.k)


def recall_at_k(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows i of a (queries, candidates) similarity whose column i is in the top k."""
    num_queries = similarity.shape[0]
    k = min(k, similarity.shape[1])
    top_k = similarity.topk(k, dim=1).indices
    targets = torch.arange(num_queries, device=similarity.device).unsqueeze(1)
    return (top_k == targets).any(dim=1).float().mean()


def first_occurrences(sample_index: torch.Tensor) -> torch.Tensor:
    """Return the positions of the first occurrence of each distinct value, in input order."""
    positions = torch.arange(sample_index.numel(), device=sample_index.device)
    first = torch.full((int(sample_index.max()) + 1,), sample_index.numel(), device=sample_index.device)
    first.scatter_reduce_(0, sample_index, positions, reduce='amin')
    return positions[first[sample_index] == positions]


def _concat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    # torchmetrics concatenates list states itself after a distributed sync.
    return torch.cat(state, dim=0) if isinstance(state, list) else state
