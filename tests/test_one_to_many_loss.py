import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss


def random_features(*shape, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def reference_clip_loss(anchor, other, logit_scale):
    """Symmetric InfoNCE written out row by row, in float64."""
    logits = logit_scale * anchor @ other.T
    batch = logits.shape[0]
    anchor_terms = [-(logits[i, i] - torch.logsumexp(logits[i, :], dim=0)) for i in range(batch)]
    other_terms = [-(logits[i, i] - torch.logsumexp(logits[:, i], dim=0)) for i in range(batch)]
    return (torch.stack(anchor_terms).mean() + torch.stack(other_terms).mean()) / 2


def test_one_to_many_loss_matches_clip_loss():
    # Models hand normalised features to the loss, so compare gradients with respect to the
    # raw features before normalisation, as a model's parameters see them.
    generator = torch.Generator().manual_seed(1)
    raw_text = torch.randn(8, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    raw_image = torch.randn(8, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    logit_scale = torch.tensor(14.3, dtype=torch.float64)

    text, image = F.normalize(raw_text, dim=-1), F.normalize(raw_image, dim=-1)
    ours = OneToManyClipLoss(num_multi_encoders=1, aggregation='mean')(text, [image], logit_scale)
    our_grads = torch.autograd.grad(ours, [raw_text, raw_image])

    text, image = F.normalize(raw_text, dim=-1), F.normalize(raw_image, dim=-1)
    theirs = ClipLoss()(image, text, logit_scale)
    their_grads = torch.autograd.grad(theirs, [raw_text, raw_image])

    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grads[0], their_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grads[1], their_grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('aggregation', ['mean', 'max'])
def test_one_to_many_loss_aggregation_matches_reference(aggregation):
    text = random_features(6, 8, seed=3)
    towers = [random_features(6, 8, seed=4 + n) for n in range(3)]
    logit_scale = torch.tensor(10.0, dtype=torch.float64)

    stacked = torch.stack(towers)
    combined = stacked.mean(0) if aggregation == 'mean' else stacked.amax(0)
    expected = reference_clip_loss(text, combined / combined.norm(dim=-1, keepdim=True), logit_scale)

    loss = OneToManyClipLoss(num_multi_encoders=3, aggregation=aggregation)(text, towers, logit_scale)

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_one_to_many_loss_max_aggregation_is_elementwise():
    loss_fn = OneToManyClipLoss(num_multi_encoders=2, aggregation='max')
    first = torch.tensor([[1.0, 0.0, 0.0]])
    second = torch.tensor([[0.0, 1.0, 0.0]])

    aggregated = loss_fn.aggregate([first, second])

    expected = torch.tensor([[1.0, 1.0, 0.0]]) / 2**0.5
    torch.testing.assert_close(aggregated, expected)


def test_one_to_many_loss_fixed_weights_are_uniform():
    text = random_features(5, 8, seed=7)
    towers = [random_features(5, 8, seed=8 + n) for n in range(2)]
    logit_scale = torch.tensor(5.0, dtype=torch.float64)

    weighted = OneToManyClipLoss(num_multi_encoders=2, aggregation='weighted')
    mean = OneToManyClipLoss(num_multi_encoders=2, aggregation='mean')

    assert list(weighted.parameters()) == []
    torch.testing.assert_close(weighted(text, towers, logit_scale), mean(text, towers, logit_scale))


def test_one_to_many_loss_learnable_weights_match_reference():
    text = random_features(6, 8, seed=11)
    towers = [random_features(6, 8, seed=12 + n) for n in range(3)]
    logit_scale = torch.tensor(7.0, dtype=torch.float64)
    loss_fn = OneToManyClipLoss(num_multi_encoders=3, aggregation='weighted', learnable_weights=True).double()
    with torch.no_grad():
        loss_fn.aggregator.weight_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))

    loss = loss_fn(text, towers, logit_scale)
    loss.backward()

    exp_logits = torch.exp(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    weights = exp_logits / exp_logits.sum()
    combined = sum(w * f for w, f in zip(weights, towers))
    expected = reference_clip_loss(text, combined / combined.norm(dim=-1, keepdim=True), logit_scale)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss_fn.aggregator.weight_logits.grad is not None
    assert loss_fn.aggregator.weight_logits.grad.abs().sum() > 0


def test_one_to_many_loss_logit_scale_gets_gradient():
    text = random_features(4, 8, seed=21)
    towers = [random_features(4, 8, seed=22 + n) for n in range(2)]
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    OneToManyClipLoss(num_multi_encoders=2)(text, towers, log_scale.exp()).backward()

    assert log_scale.grad is not None
    assert log_scale.grad != 0


def test_one_to_many_loss_rejects_wrong_feature_count():
    loss_fn = OneToManyClipLoss(num_multi_encoders=3)
    features = random_features(4, 8)

    with pytest.raises(ValueError, match='num_multi_encoders=3 but 2 tensors were passed'):
        loss_fn(features, [features, features], torch.tensor(1.0))


def test_one_to_many_loss_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation='sum' is not supported"):
        OneToManyClipLoss(aggregation='sum')


def test_learnable_weights_need_weighted_aggregation():
    with pytest.raises(ValueError, match="learnable_weights=True needs aggregation='weighted'"):
        OneToManyClipLoss(aggregation='mean', learnable_weights=True)


def test_pairwise_loss_averages_tower_losses():
    text = random_features(6, 8, seed=31)
    towers = [random_features(6, 8, seed=32 + n) for n in range(3)]
    logit_scale = torch.tensor(9.0, dtype=torch.float64)

    result = OneToManyClipLoss(num_multi_encoders=3, aggregation='pairwise')(text, towers, logit_scale, output_dict=True)

    expected_terms = [reference_clip_loss(text, tower, logit_scale) for tower in towers]
    torch.testing.assert_close(result['total'], torch.stack(expected_terms).mean(), rtol=1e-12, atol=1e-12)
    for index, expected in enumerate(expected_terms):
        torch.testing.assert_close(result[f'vision_{index}'], expected, rtol=1e-12, atol=1e-12)


def test_tower_terms_have_no_gradient():
    vision = random_features(4, 8, seed=41)
    texts = [random_features(4, 8, seed=42 + n) for n in range(2)]
    loss_fn = OneToManyClipLoss(text_to_multi_vision=False, num_multi_encoders=2, aggregation='mean')

    result = loss_fn(vision, texts, torch.tensor(3.0, dtype=torch.float64), output_dict=True)

    assert set(result) == {'total', 'text_0', 'text_1'}
    torch.testing.assert_close(result['text_1'], reference_clip_loss(vision, texts[1], 3.0), rtol=1e-12, atol=1e-12)
    assert not result['text_0'].requires_grad


@pytest.mark.parametrize('aggregation', ['mean', 'max', 'weighted', 'pairwise'])
def test_loss_gradients_reach_scale_and_weights(aggregation):
    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(4, 6, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    learnable = aggregation == 'weighted'
    one_to_many = OneToManyClipLoss(num_multi_encoders=3, aggregation=aggregation, learnable_weights=learnable).double()
    multi = MultiEncoderClipLoss(2, 2, aggregation=aggregation, learnable_weights=learnable).double()
    features = F.normalize(raw, dim=-1)

    loss = one_to_many(features[0], list(features[1:]), log_scale.exp())
    loss = loss + multi(list(features[:2]), list(features[2:]), log_scale.exp())
    loss.backward()

    assert log_scale.grad != 0
    assert raw.grad.abs().sum(dim=(1, 2)).min() > 0
    weights = [one_to_many.aggregator.weight_logits, multi.vision_aggregator.weight_logits,
               multi.text_aggregator.weight_logits]
    for weight in weights:
        if learnable:
            assert weight.grad is not None
            assert weight.grad.abs().sum() > 0
        else:
            assert not weight.requires_grad


def test_multi_encoder_loss_matches_clip_loss():
    generator = torch.Generator().manual_seed(5)
    raw_image = torch.randn(8, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    raw_text = torch.randn(8, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    logit_scale = torch.tensor(20.0, dtype=torch.float64)

    ours = MultiEncoderClipLoss(1, 1)([F.normalize(raw_image, dim=-1)], [F.normalize(raw_text, dim=-1)], logit_scale)
    our_grads = torch.autograd.grad(ours, [raw_image, raw_text])
    theirs = ClipLoss()(F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1), logit_scale)
    their_grads = torch.autograd.grad(theirs, [raw_image, raw_text])

    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grads[0], their_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grads[1], their_grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('aggregation', ['mean', 'max'])
def test_multi_encoder_loss_aggregates_each_side(aggregation):
    vision = [random_features(5, 8, seed=51 + n) for n in range(3)]
    text = [random_features(5, 8, seed=61 + n) for n in range(2)]
    logit_scale = torch.tensor(6.0, dtype=torch.float64)

    loss = MultiEncoderClipLoss(3, 2, aggregation=aggregation)(vision, text, logit_scale)

    def combine(features):
        stacked = torch.stack(features)
        combined = stacked.mean(0) if aggregation == 'mean' else stacked.amax(0)
        return combined / combined.norm(dim=-1, keepdim=True)

    expected = reference_clip_loss(combine(vision), combine(text), logit_scale)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_multi_encoder_loss_pairwise_averages_all_pairs():
    vision = [random_features(5, 8, seed=71 + n) for n in range(2)]
    text = [random_features(5, 8, seed=81 + n) for n in range(3)]
    logit_scale = torch.tensor(4.0, dtype=torch.float64)

    result = MultiEncoderClipLoss(2, 3, aggregation='pairwise')(vision, text, logit_scale, output_dict=True)

    expected = {f'vision_{i}_text_{j}': reference_clip_loss(v, t, logit_scale)
                for i, v in enumerate(vision) for j, t in enumerate(text)}
    assert set(result) == {'total', *expected}
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result['total'], torch.stack(list(expected.values())).mean(), rtol=1e-12, atol=1e-12)


def test_multi_encoder_loss_rejects_wrong_text_count():
    features = random_features(4, 8)

    with pytest.raises(ValueError, match='num_text_encoders=2 but 3 tensors were passed'):
        MultiEncoderClipLoss(1, 2)([features], [features] * 3, torch.tensor(1.0))
