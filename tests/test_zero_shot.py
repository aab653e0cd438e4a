"""Tests of composer_clip.zero_shot: accuracy against a float64 reference, eval mode, and FSDP2 on 2 ranks.

The model has two vision towers at different image sizes, a ResNet with batch norm and a
ViT. It has two text towers with different tokenizers: CLIP's byte-pair encoding, and a
tiny RoBERTa with dropout. So every view (`vision_i`, `text_j`, `aggregate`) is exercised.
"""

import copy
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from open_clip import build_zero_shot_classifier
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from streaming import MDSWriter

from composer_clip.base_model import TransformersTextEncoder
from composer_clip.composer_model import ComposerCLIP
from composer_clip.data import write_image_text_mds
from composer_clip.multi_encoder_model import MultiEncoderCLIP, MultiVisionCLIP
from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss
from composer_clip.openclip_towers import OpenCLIPTextTransformer
from composer_clip.timm_model import TimmModel
from composer_clip.zero_shot import (
    ZeroShotClassification,
    build_classifiers,
    build_zero_shot_dataloader,
    encode_class_prompts,
    evaluate_zero_shot,
    format_prompts,
    read_class_names,
    read_labels,
    resolve_templates,
    tokenize_prompts,
)

EMBED_DIM = 16
# An odd number of samples: Streaming gives each of 2 ranks 11 samples, one of them repeated.
NUM_SAMPLES = 21
CLASS_NAMES = ['cat', 'dog', 'red bus', 'apple', 'house', 'tree', 'bicycle', 'boat']
TEMPLATES = ['a {} picture.', 'the {}', 'one {} on a table.']
VIEWS = ('vision_0', 'vision_1', 'text_0', 'text_1', 'aggregate')


def random_png(generator: np.random.Generator) -> bytes:
    pixels = generator.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def labelled_images(tmp_path_factory):
    """An MDS folder of random images with captions, and a labels file in the demo's val_classes.json format."""
    root = tmp_path_factory.mktemp('zero_shot')
    generator = np.random.default_rng(3)
    images = [random_png(generator) for _ in range(NUM_SAMPLES)]
    labels = [int(label) for label in generator.integers(0, len(CLASS_NAMES), size=NUM_SAMPLES)]

    write_image_text_mds(((image, f'caption {index}') for index, image in enumerate(images)), root / 'val')
    classes_file = root / 'val_classes.json'
    classes_file.write_text(json.dumps({
        'classes': CLASS_NAMES,
        'samples': [{'index': index, 'label': label} for index, label in enumerate(labels)],
    }))
    return {'folder': root / 'val', 'classes_file': classes_file, 'images': images, 'labels': labels}


def build_composer_model(roberta_dir, rank=0, world_size=1):
    torch.manual_seed(0)
    vision = [
        TimmModel('resnet10t', EMBED_DIM, image_size=32),
        TimmModel('vit_tiny_patch16_224', EMBED_DIM, image_size=48),
    ]
    text = [
        OpenCLIPTextTransformer(context_length=12, width=32, heads=2, layers=2, output_dim=EMBED_DIM),
        TransformersTextEncoder(str(roberta_dir), EMBED_DIM, pooler_type='mean', context_length=12),
    ]
    model = MultiEncoderCLIP(vision, text, embed_dim=EMBED_DIM)
    loss_fn = MultiEncoderClipLoss(2, 2, aggregation='weighted', learnable_weights=True, rank=rank,
                                   world_size=world_size)
    with torch.no_grad():
        # Unequal weights, so that the aggregate differs from the mean of the towers.
        loss_fn.vision_aggregator.weight_logits.copy_(torch.tensor([0.8, -0.3]))
        loss_fn.text_aggregator.weight_logits.copy_(torch.tensor([-0.5, 0.4]))
    return ComposerCLIP(model, loss_fn)


def zero_shot_loader(composer_model, labelled_images, batch_size=8):
    labels = read_labels(labelled_images['classes_file'], len(CLASS_NAMES))
    return build_zero_shot_dataloader(
        composer_model.model.vision_towers, batch_size, local=str(labelled_images['folder']), labels=labels
    )


# The float64 reference.


def features_float64(tower, inputs):
    tower = copy.deepcopy(tower).double().eval()
    with torch.no_grad():
        features = tower(inputs.double() if inputs.is_floating_point() else inputs)
    features = features.numpy()
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def aggregate_float64(features, weight_logits):
    weights = np.exp(weight_logits.detach().double().numpy())
    weights /= weights.sum()
    combined = sum(weight * tower_features for weight, tower_features in zip(weights, features))
    return combined / np.linalg.norm(combined, axis=-1, keepdims=True)


def classifier_float64(prompt_features):
    per_class = prompt_features.reshape(len(CLASS_NAMES), len(TEMPLATES), -1).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def reference_accuracy(composer_model, labelled_images):
    """Top-1 and top-5 accuracy per view, computed in float64 numpy from the towers run one by one."""
    model, loss_fn = composer_model.model, composer_model.loss_fn
    pil_images = [Image.open(io.BytesIO(data)).convert('RGB') for data in labelled_images['images']]
    vision = []
    for tower in model.vision_towers:
        transform = image_transform_v2(PreprocessCfg(**tower.preprocess_cfg), is_train=False)
        vision.append(features_float64(tower, torch.stack([transform(image) for image in pil_images])))
    vision_aggregate = aggregate_float64(vision, loss_fn.vision_aggregator.weight_logits)

    prompts = [template.format(name) for name in CLASS_NAMES for template in TEMPLATES]
    text = [features_float64(tower, torch.as_tensor(tower.get_tokenizer()(prompts))) for tower in model.text_towers]
    text_aggregate = aggregate_float64(text, loss_fn.text_aggregator.weight_logits)

    pairs = {
        'vision_0': (vision[0], classifier_float64(text_aggregate)),
        'vision_1': (vision[1], classifier_float64(text_aggregate)),
        'text_0': (vision_aggregate, classifier_float64(text[0])),
        'text_1': (vision_aggregate, classifier_float64(text[1])),
        'aggregate': (vision_aggregate, classifier_float64(text_aggregate)),
    }
    labels = np.array(labelled_images['labels'])
    accuracy = {}
    for view, (image_features, classifier) in pairs.items():
        ranking = np.argsort(-(image_features @ classifier.T), axis=1, kind='stable')
        for k in (1, 5):
            accuracy[f'top{k}/{view}'] = float((ranking[:, :k] == labels[:, None]).any(axis=1).mean())
    return accuracy


@pytest.fixture(scope='module')
def single_process_result(tiny_roberta_dir, labelled_images):
    """The zero-shot result of one process on the model in eval mode."""
    composer_model = build_composer_model(tiny_roberta_dir).eval()
    # A text batch of 5 splits the 24 prompts into several forwards.
    return evaluate_zero_shot(composer_model, zero_shot_loader(composer_model, labelled_images), CLASS_NAMES,
                              TEMPLATES, text_batch_size=5)


def test_zero_shot_matches_float64_reference(tiny_roberta_dir, labelled_images, single_process_result):
    result = single_process_result
    expected = reference_accuracy(build_composer_model(tiny_roberta_dir), labelled_images)

    assert result.num_samples == NUM_SAMPLES
    assert result.labels.tolist() == labelled_images['labels']
    assert set(result.metrics) == {f'top{k}/{view}' for k in (1, 5) for view in VIEWS}
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-12), name
    # Random towers: accuracies vary by view and are neither 0 nor 1, so the comparison means something.
    assert len(set(result.metrics.values())) > 3
    assert 0 < result.metrics['top5/aggregate'] < 1


def test_classifier_matches_open_clip_builder(labelled_images):
    torch.manual_seed(1)
    text_tower = OpenCLIPTextTransformer(context_length=12, width=32, heads=2, layers=2, output_dim=EMBED_DIM)
    model = MultiVisionCLIP([TimmModel('resnet10t', EMBED_DIM, image_size=32)], text_tower, embed_dim=EMBED_DIM)
    model.eval()
    loss_fn = OneToManyClipLoss(num_multi_encoders=1)

    prompt_tokens = tokenize_prompts(model.text_towers, format_prompts(CLASS_NAMES, TEMPLATES))
    prompt_features = encode_class_prompts(model, loss_fn, prompt_tokens, 7, torch.device('cpu'))
    classifier = build_classifiers(prompt_features, len(CLASS_NAMES))['aggregate']
    expected = build_zero_shot_classifier(model, text_tower.get_tokenizer(), CLASS_NAMES, TEMPLATES,
                                          num_classes_per_batch=3)

    assert classifier.shape == (len(CLASS_NAMES), EMBED_DIM)
    torch.testing.assert_close(classifier, expected.T, rtol=1e-5, atol=1e-6)


def test_zero_shot_runs_in_eval_mode(tiny_roberta_dir, labelled_images, single_process_result):
    composer_model = build_composer_model(tiny_roberta_dir)
    loader = zero_shot_loader(composer_model, labelled_images)
    composer_model.train()
    # A layer that a tower keeps in eval mode during training, as frozen batch norm statistics are.
    frozen_norm = composer_model.model.vision_towers[0].trunk.bn1
    frozen_norm.eval()
    modes = {name: module.training for name, module in composer_model.named_modules()}
    norm_statistics = composer_model.model.vision_towers[0].trunk.layer1[0].bn1.running_mean.clone()

    rng_state = torch.random.get_rng_state()
    first = evaluate_zero_shot(composer_model, loader, CLASS_NAMES, TEMPLATES)
    second = evaluate_zero_shot(composer_model, loader, CLASS_NAMES, TEMPLATES)

    assert first.metrics == second.metrics
    # Dropout and batch statistics would change the result if the towers ran in training mode.
    assert first.metrics == single_process_result.metrics
    for view, predictions in first.predictions.items():
        assert torch.equal(predictions, single_process_result.predictions[view]), view
    assert {name: module.training for name, module in composer_model.named_modules()} == modes
    assert not frozen_norm.training
    assert torch.equal(composer_model.model.vision_towers[0].trunk.layer1[0].bn1.running_mean, norm_statistics)
    # The DataLoader drew its seeds from a copy of the global generator, so training's random numbers are unchanged.
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_dataset_reads_label_column(tmp_path):
    generator = np.random.default_rng(5)
    folder = tmp_path / 'labelled'
    with MDSWriter(out=str(folder), columns={'image': 'bytes', 'label': 'int'}) as writer:
        for label in (2, 0, 1):
            writer.write({'image': random_png(generator), 'label': label})
    tower = TimmModel('resnet10t', EMBED_DIM, image_size=32)

    loader = build_zero_shot_dataloader([tower, tower], 2, local=str(folder))
    batches = list(loader)

    assert [batch['label'].tolist() for batch in batches] == [[2, 0], [1]]
    assert batches[0]['images'][0].shape == (2, 3, 32, 32)
    # Towers with equal preprocessing share one tensor per sample.
    assert torch.equal(batches[0]['images'][0], batches[0]['images'][1])


def test_templates_and_class_names_from_files(tmp_path, labelled_images):
    names_file = tmp_path / 'names.txt'
    names_file.write_text('cat\n\nred bus\n')

    assert read_class_names(labelled_images['classes_file']) == CLASS_NAMES
    assert read_class_names(names_file) == ['cat', 'red bus']
    assert len(resolve_templates('openai')) == 80
    assert resolve_templates('simple')[0].format('cat') == 'cat.'
    assert format_prompts(['cat'], ['a {}.', lambda name: f'{name}!']) == ['a cat.', 'cat!']
    with pytest.raises(ValueError, match="templates='imagenet' is unknown"):
        resolve_templates('imagenet')
    with pytest.raises(ValueError, match="has no '{}'"):
        resolve_templates(['a photo'])
    with pytest.raises(ValueError, match='outside the 2 class names'):
        read_labels(labelled_images['classes_file'], 2)


# Two ranks under Composer's FSDP2.


def evaluate_on_rank(rank, world_size, port, roberta_dir, labelled_images, out_file):
    os.environ.update({
        'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(world_size),
        'LOCAL_WORLD_SIZE': str(world_size), 'NODE_RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
    })
    torch.set_num_threads(1)
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils.parallelism import FSDP2Config
    from omegaconf import OmegaConf

    from composer_clip.builders import build_dataloader
    from composer_clip.fsdp2_utils import reshape_scalar_parameters

    composer_model = build_composer_model(roberta_dir, rank, world_size)
    reshape_scalar_parameters(composer_model)
    towers = composer_model.model
    image_text = build_dataloader(
        OmegaConf.create({'local': str(labelled_images['folder']), 'num_workers': 0}), list(towers.vision_towers),
        list(towers.text_towers), 4, is_train=False,
    )
    callback = ZeroShotClassification(zero_shot_loader(composer_model, labelled_images, batch_size=4), CLASS_NAMES,
                                      TEMPLATES, text_batch_size=5)
    trainer = Trainer(
        model=composer_model,
        eval_dataloader=Evaluator(label='eval', dataloader=image_text, metric_names=list(composer_model.eval_metrics)),
        callbacks=[callback],
        parallelism_config={'fsdp': FSDP2Config(state_dict_type='sharded')},
        device='cpu',
        precision='fp32',
        progress_bar=False,
        dist_timeout=60,
        seed=0,
    )
    sharded = sum(type(parameter).__name__ == 'DTensor' for parameter in composer_model.parameters())

    trainer.eval()

    zero_shot = {name: value for name, value in trainer.state.eval_metric_values.items() if name.startswith('zero_shot/')}
    torch.save({'metrics': zero_shot, 'num_samples': callback.result.num_samples, 'sharded': sharded,
                'predictions': callback.result.predictions}, f'{out_file}.rank{rank}')
    trainer.close()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_zero_shot_under_fsdp2_matches_single_process(tiny_roberta_dir, labelled_images, single_process_result,
                                                      tmp_path):
    out_file = tmp_path / 'zero_shot'
    mp.start_processes(
        evaluate_on_rank, args=(2, free_port(), tiny_roberta_dir, labelled_images, str(out_file)), nprocs=2,
        start_method='spawn',
    )
    ranks = [torch.load(f'{out_file}.rank{rank}', weights_only=True) for rank in range(2)]
    expected = single_process_result

    for rank, recorded in enumerate(ranks):
        assert recorded['sharded'] > 0, rank
        assert recorded['num_samples'] == NUM_SAMPLES, rank
        assert recorded['metrics'] == {f'zero_shot/{name}': value for name, value in expected.metrics.items()}, rank
        for view, predictions in expected.predictions.items():
            assert torch.equal(recorded['predictions'][view][:, 0], predictions[:, 0]), (rank, view)
