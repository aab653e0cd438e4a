import math

import pytest
import torch
from composer import Trainer
from composer.core import Evaluator
from torch import nn

from composer_clip.callbacks import ClampLogitScale
from composer_clip.composer_model import ComposerCLIP, clip_data_spec
from composer_clip.multi_encoder_model import MultiVisionCLIP
from composer_clip.one_to_many_loss import OneToManyClipLoss

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
    def __init__(self):
        super().__init__()
        self.output_dim = EMBED_DIM
        self.embedding = nn.EmbeddingBag(100, EMBED_DIM)

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
        initial_loss = composer_model.loss(composer_model(batch), batch).item()
    initial_weights = composer_model.loss_fn.weight_logits.detach().clone()

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
        final_loss = composer_model.loss(composer_model(batch), batch).item()
    assert final_loss < 0.5 * initial_loss
    # The learnable aggregation weights are trained with the towers.
    assert not torch.equal(composer_model.loss_fn.weight_logits.detach(), initial_weights)
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
