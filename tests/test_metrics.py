import pytest
import torch
import torch.nn.functional as F

from composer_clip.metrics import InBatchAccuracy, RetrievalRecall


def brute_force_recall(queries, candidates, k):
    hits = 0
    for i in range(queries.shape[0]):
        scores = [float(queries[i] @ candidates[j]) for j in range(candidates.shape[0])]
        better = sum(score > scores[i] for score in scores)
        hits += better < k
    return hits / queries.shape[0]


@pytest.mark.parametrize('k', [1, 3, 5])
@pytest.mark.parametrize('direction', ['image_to_text', 'text_to_image'])
def test_retrieval_recall_matches_brute_force(k, direction):
    generator = torch.Generator().manual_seed(k)
    images = F.normalize(torch.randn(20, 8, generator=generator), dim=-1)
    texts = F.normalize(images + 0.9 * torch.randn(20, 8, generator=generator), dim=-1)
    metric = RetrievalRecall(k=k, direction=direction)

    for start in range(0, 20, 6):
        batch = slice(start, start + 6)
        metric.update(images[batch], texts[batch], torch.arange(20)[batch])

    queries, candidates = (images, texts) if direction == 'image_to_text' else (texts, images)
    assert metric.compute().item() == pytest.approx(brute_force_recall(queries, candidates, k))


def test_retrieval_recall_counts_duplicate_samples_once():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    metric = RetrievalRecall(k=1)

    metric.update(images, texts, torch.arange(6))
    # A sampler that pads ranks to equal length repeats samples 0 and 1.
    metric.update(images[:2], texts[:2], torch.tensor([0, 1]))

    assert metric.compute().item() == pytest.approx(brute_force_recall(images, texts, 1))


def test_in_batch_accuracy_counts_both_directions():
    images = torch.eye(3)
    # Text 2 is closest to image 1, and image 1 is closest to text 1 and 2.
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.1]])
    metric = InBatchAccuracy()

    metric.update(images, texts)

    # image to text: images 0 and 1 hit, image 2 picks text 2 (0.1 > 0): 3 of 3.
    # text to image: texts 0 and 1 hit, text 2 picks image 1: 2 of 3.
    assert metric.compute().item() == pytest.approx(5 / 6)


def test_retrieval_recall_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction='both' is not supported"):
        RetrievalRecall(direction='both')
