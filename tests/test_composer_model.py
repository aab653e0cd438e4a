import math

import pytest
import torch
from composer import Callback, Trainer
from composer.core import Evaluator
from torch import nn

from composer_clip.callbacks import ClampLogitScale, MemoryMonitor, StopOnNonFiniteLoss
from composer_clip.composer_model import ComposerCLIP, clip_data_spec
from composer_clip.multi_encoder_model import MultiEncoderCLIP, MultiTextCLIP, MultiVisionCLIP
from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss

EMBED_DIM = 16
BATCH = 8


class FlattenProjectVision(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.output_dim = EMBED_DIM
        self.proj = nn.Linear(in_features, EMBED_DIM)

    def forward(self, images):
        return self.proj(images.flatten(1))


class BagOfTokensText(nn.Module):
    def __init__(self, vocab_size=100):
        super().__init__()
        self.output_dim = EMBED_DIM
        self.embedding = nn.EmbeddingBag(vocab_size, EMBED_DIM)

    def forward(self, token_ids):
        return self.embedding(token_ids)


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    return {
        'images': [torch.randn(BATCH, 3, 4, 4, generator=generator), torch.randn(BATCH, 3, 6, 6, generator=generator)],
        'texts': [torch.randint(0, 100, (BATCH, 5), generator=generator)],
        'sample_index': torch.arange(BATCH),
    }


def build_composer_model(aggregation='weighted', learnable_weights=True):
    torch.manual_seed(0)
    model = MultiVisionCLIP(
        [FlattenProjectVision(3 * 4 * 4), FlattenProjectVision(3 * 6 * 6)], BagOfTokensText(), embed_dim=EMBED_DIM
    )
    loss_fn = OneToManyClipLoss(num_multi_encoders=2, aggregation=aggregation, learnable_weights=learnable_weights)
    return ComposerCLIP(model, loss_fn)


def test_composer_clip_loss_decreases_on_fixed_batch():
    composer_model = build_composer_model()
    batch = fixed_batch()
    with torch.no_grad():
        initial_loss = composer_model.loss(composer_model(batch), batch)['total'].item()
    initial_weights = composer_model.loss_fn.aggregator.weight_logits.detach().clone()

    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([batch] * 30),
        max_duration='30ba',
        device_train_microbatch_size=BATCH,
        optimizers=torch.optim.Adam(composer_model.parameters(), lr=0.05),
        callbacks=[ClampLogitScale()],
        device='cpu',
        progress_bar=False,
        seed=0,
    )
    trainer.fit()

    with torch.no_grad():
        final_loss = composer_model.loss(composer_model(batch), batch)['total'].item()
    assert final_loss < 0.5 * initial_loss
    # The learnable aggregation weights are trained with the towers.
    assert not torch.equal(composer_model.loss_fn.aggregator.weight_logits.detach(), initial_weights)
    assert composer_model.model.logit_scale.item() <= math.log(100)
    assert trainer.state.train_metric_values['in_batch_accuracy/aggregate'].item() == pytest.approx(1.0)


def test_composer_clip_eval_reports_recall_per_tower():
    composer_model = build_composer_model(aggregation='mean', learnable_weights=False)
    batch = fixed_batch()
    evaluator = Evaluator(
        label='eval',
        dataloader=clip_data_spec([batch]),
        metric_names=list(composer_model.eval_metrics),
        device_eval_microbatch_size=BATCH,
    )
    trainer = Trainer(
        model=composer_model,
        eval_dataloader=evaluator,
        optimizers=torch.optim.SGD(composer_model.parameters(), lr=0.0),
        device='cpu',
        progress_bar=False,
    )

    trainer.eval()

    values = trainer.state.eval_metric_values
    with torch.no_grad():
        outputs = composer_model(batch)
    for tower, image_features in enumerate(outputs['vision_features_list']):
        similarity = image_features @ outputs['text_features'].T
        expected = (similarity.argmax(dim=1) == torch.arange(BATCH)).float().mean()
        assert values[f'i2t_recall@1/vision_{tower}'].item() == pytest.approx(expected.item())
    assert values['i2t_recall@10/aggregate'].item() == pytest.approx(1.0)
    assert {f'{d}_recall@{k}/{t}' for d in ('i2t', 't2i') for k in (1, 5, 10)
            for t in ('vision_0', 'vision_1', 'aggregate')} == set(values)


def test_composer_clip_rejects_tower_count_mismatch():
    model = MultiVisionCLIP([FlattenProjectVision(48)], BagOfTokensText(), embed_dim=EMBED_DIM)

    with pytest.raises(ValueError, match='1 vision encoders but the loss has num_multi_encoders=2'):
        ComposerCLIP(model, OneToManyClipLoss(num_multi_encoders=2))


def two_tokenizer_batch():
    """Two text towers with different vocabularies see different token ids of one caption."""
    generator = torch.Generator().manual_seed(1)
    return {
        'images': [torch.randn(BATCH, 3, 4, 4, generator=generator), torch.randn(BATCH, 3, 6, 6, generator=generator)],
        'texts': [torch.randint(0, 100, (BATCH, 5), generator=generator),
                  torch.randint(0, 30, (BATCH, 7), generator=generator)],
        'sample_index': torch.arange(BATCH),
    }


def fit(composer_model, batch, steps=20, lr=0.05):
    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([batch] * steps),
        max_duration=f'{steps}ba',
        device_train_microbatch_size=BATCH,
        optimizers=torch.optim.Adam(composer_model.parameters(), lr=lr),
        callbacks=[ClampLogitScale()],
        device='cpu',
        progress_bar=False,
        seed=0,
    )
    trainer.fit()
    return trainer


@pytest.mark.parametrize('aggregation', ['weighted', 'pairwise'])
def test_composer_clip_trains_multi_text(aggregation):
    torch.manual_seed(0)
    model = MultiTextCLIP(FlattenProjectVision(48), [BagOfTokensText(100), BagOfTokensText(30)], embed_dim=EMBED_DIM)
    loss_fn = OneToManyClipLoss(text_to_multi_vision=False, num_multi_encoders=2, aggregation=aggregation,
                                learnable_weights=aggregation == 'weighted')
    composer_model = ComposerCLIP(model, loss_fn)
    batch = two_tokenizer_batch()
    batch['images'] = batch['images'][0]
    with torch.no_grad():
        initial = composer_model.loss(composer_model(batch), batch)

    trainer = fit(composer_model, batch)

    with torch.no_grad():
        final = composer_model.loss(composer_model(batch), batch)
    assert set(final) == {'total', 'text_0', 'text_1'}
    assert final['total'] < 0.5 * initial['total']
    assert set(trainer.state.train_metric_values) == {
        'in_batch_accuracy/text_0', 'in_batch_accuracy/text_1', 'in_batch_accuracy/aggregate'}


def test_composer_clip_trains_multi_encoder():
    torch.manual_seed(0)
    model = MultiEncoderCLIP(
        [FlattenProjectVision(48), FlattenProjectVision(108)], [BagOfTokensText(100), BagOfTokensText(30)],
        embed_dim=EMBED_DIM,
    )
    composer_model = ComposerCLIP(model, MultiEncoderClipLoss(2, 2, aggregation='weighted', learnable_weights=True))
    batch = two_tokenizer_batch()
    with torch.no_grad():
        initial = composer_model.loss(composer_model(batch), batch)

    trainer = fit(composer_model, batch)

    with torch.no_grad():
        final = composer_model.loss(composer_model(batch), batch)
    assert final['total'] < 0.5 * initial['total']
    assert {'vision_0_text_0', 'vision_1_text_1'} <= set(final)
    assert composer_model.loss_fn.vision_aggregator.weight_logits.abs().sum() > 0
    assert composer_model.loss_fn.text_aggregator.weight_logits.abs().sum() > 0
    assert {'in_batch_accuracy/vision_1', 'in_batch_accuracy/text_1'} <= set(trainer.state.train_metric_values)


def test_clamp_logit_scale_after_each_step():
    composer_model = build_composer_model(aggregation='mean', learnable_weights=False)
    batch = fixed_batch()
    seen = []

    class PushAndRecordScale(Callback):
        def after_backward(self, state, logger):
            # A gradient that makes the optimizer step raise the scale far past ln(100).
            composer_model.model.logit_scale.grad.fill_(-1000.0)

        def batch_end(self, state, logger):
            seen.append(composer_model.model.logit_scale.item())

    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([batch] * 6),
        max_duration='6ba',
        device_train_microbatch_size=BATCH,
        optimizers=torch.optim.SGD([composer_model.model.logit_scale], lr=1.0),
        callbacks=[ClampLogitScale(), PushAndRecordScale()],
        device='cpu',
        progress_bar=False,
    )
    trainer.fit()

    assert len(seen) == 6
    for value in seen:
        assert value == pytest.approx(math.log(100))


def test_composer_clip_rejects_wrong_loss_direction():
    model = MultiTextCLIP(FlattenProjectVision(48), [BagOfTokensText(), BagOfTokensText()], embed_dim=EMBED_DIM)

    with pytest.raises(ValueError, match=r'text_to_multi_vision=True; build OneToManyClipLoss\(text_to_multi_vision=False\)'):
        ComposerCLIP(model, OneToManyClipLoss(num_multi_encoders=2))


def test_memory_monitor_logs_every_interval():
    from composer.loggers import InMemoryLogger

    composer_model = build_composer_model(aggregation='mean', learnable_weights=False)
    in_memory = InMemoryLogger()
    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([fixed_batch()] * 4),
        max_duration='4ba',
        device_train_microbatch_size=BATCH,
        optimizers=torch.optim.SGD(composer_model.parameters(), lr=0.1),
        callbacks=[MemoryMonitor(interval=2)],
        loggers=[in_memory],
        device='cpu',
        progress_bar=False,
    )
    trainer.fit()

    logged = in_memory.data['memory/rank0/rss_gib']
    assert [int(timestamp.batch) for timestamp, _ in logged] == [2, 4]
    for _, value in logged:
        assert 0.01 < value < 64


def test_non_finite_loss_stops_before_step_and_checkpoint(tmp_path):
    composer_model = build_composer_model(aggregation='mean', learnable_weights=False)
    good = fixed_batch()
    bad = fixed_batch()
    bad['images'][0][3] = float('nan')
    weights_after_first_step = {}

    class RecordWeights(Callback):
        def batch_end(self, state, logger):
            weights_after_first_step.update(
                {key: value.detach().clone() for key, value in composer_model.state_dict().items()})

    trainer = Trainer(
        model=composer_model,
        train_dataloader=clip_data_spec([good, bad, good]),
        max_duration='3ba',
        device_train_microbatch_size=BATCH,
        optimizers=torch.optim.SGD(composer_model.parameters(), lr=0.1),
        callbacks=[StopOnNonFiniteLoss(), RecordWeights()],
        save_folder=str(tmp_path / 'checkpoints'),
        save_interval='1ba',
        device='cpu',
        progress_bar=False,
    )

    with pytest.raises(RuntimeError, match='the loss is nan at batch 2'):
        trainer.fit()

    saved = sorted(path.name for path in (tmp_path / 'checkpoints').iterdir())
    assert saved == ['ep0-ba1-rank0.pt', 'latest-rank0.pt']
    for key, value in composer_model.state_dict().items():
        assert torch.equal(value, weights_after_first_step[key]), key
