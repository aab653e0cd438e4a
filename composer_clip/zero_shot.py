"""Zero-shot image classification with the text towers as the classifier.

Every class name is written into each prompt template ('a drawing of {}.', ...). Each text
tower encodes the prompts, and a class's classifier row is the normalised mean of its
normalised prompt embeddings (CLIP's prompt ensembling). Each image goes through every
vision tower, and the predicted classes are those with the highest cosine similarity.

The accuracies are reported per view, the same views as the retrieval metrics of
`ComposerCLIP`, with the loss's aggregators combining the towers of a side:

- `vision_i` (with several vision towers): vision tower i against the classifier of the
  aggregated text features;
- `text_j` (with several text towers): the aggregated image features against the
  classifier of text tower j;
- `aggregate`: the aggregated image features against the aggregated text classifier.
  With one text tower the text aggregate is that tower. The text aggregate combines the
  towers' features of each prompt before the mean over templates.

The evaluation set is an MDS folder with an image column. Each sample's class index
comes from a label column or from a JSON file that maps sample indices to labels, such as
the `val_classes.json` that `composer_clip.data.demo` writes next to the demo's held-out
shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Callback, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from PIL import Image
from streaming import StreamingDataset
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from composer_clip.data.transforms import build_image_transform, convert_to_rgb, decode_image
from composer_clip.one_to_many_loss import MultiEncoderClipLoss

log = logging.getLogger(__name__)

# The default prompts: short, and neutral about photos versus drawings.
SIMPLE_TEMPLATES = (
    '{}.',
    'a picture of {}.',
    'a drawing of {}.',
    'a photo of {}.',
)

# Template sets read from the installed open_clip package (`open_clip.zero_shot_metadata`).
OPENCLIP_TEMPLATE_SETS = {
    'openai': 'OPENAI_IMAGENET_TEMPLATES',
    'openclip_simple': 'SIMPLE_IMAGENET_TEMPLATES',
}

TOP_K = (1, 5)

# Keys of the `zero_shot` section of a recipe.
CONFIG_KEYS = (
    'local', 'remote', 'split', 'class_names', 'labels', 'label_key', 'image_key', 'templates', 'batch_size',
    'num_workers',
)

Template = str | Callable[[str], str]


# Class names, labels and prompts.


def resolve_templates(templates: str | Sequence[Template] | None = 'simple') -> list[Template]:
    """Return the prompt templates that `templates` names.

    Args:
        templates: 'simple' (`SIMPLE_TEMPLATES`, also for None), a name of
            `OPENCLIP_TEMPLATE_SETS` ('openai' for CLIP's 80 ImageNet prompts, 'openclip_simple'
            for OpenCLIP's shorter set), or a list of format strings with one '{}' and/or
            callables that map a class name to a prompt.
    """
    if templates is None or templates == 'simple':
        return list(SIMPLE_TEMPLATES)

    if isinstance(templates, str):
        if templates not in OPENCLIP_TEMPLATE_SETS:
            raise ValueError(
                f"templates={templates!r} is unknown; use 'simple', one of {sorted(OPENCLIP_TEMPLATE_SETS)}, "
                f"or a list of prompts with '{{}}' where the class name goes"
            )
        try:
            from open_clip import zero_shot_metadata
        except ImportError as error:
            raise ImportError(
                f"templates={templates!r} reads OpenCLIP's template set; install open_clip_torch"
            ) from error
        return list(getattr(zero_shot_metadata, OPENCLIP_TEMPLATE_SETS[templates]))

    templates = list(templates)
    if not templates:
        raise ValueError('templates is an empty list; pass at least one prompt template')
    for template in templates:
        if isinstance(template, str):
            if '{}' not in template:
                raise ValueError(f"template {template!r} has no '{{}}'; mark where the class name goes with '{{}}'")
        elif not callable(template):
            raise TypeError(f'template {template!r} is a {type(template).__name__}; pass a format string or a callable')
    return templates


def format_prompts(class_names: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Return every class's prompts, class by class: `len(class_names) * len(templates)` strings."""
    return [
        template.format(name) if isinstance(template, str) else template(name)
        for name in class_names
        for template in templates
    ]


def read_class_names(class_names: str | Path | Sequence[str]) -> list[str]:
    """Return the class names from a list or a file.

    A `.json` file contains a list of names or an object with a 'classes' list (the
    `val_classes.json` of the demo data). Any other file contains one name per line.
    """
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise FileNotFoundError(f'class_names file {path} was not found; pass a list of names or an existing file')
        if path.suffix == '.json':
            content = json.loads(path.read_text(encoding='utf-8'))
            names = content.get('classes') if isinstance(content, dict) else content
            if not isinstance(names, list):
                raise ValueError(f"{path} contains no list of class names; write a JSON list or {{'classes': [...]}}")
        else:
            names = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    else:
        names = list(class_names)

    if not names:
        raise ValueError(f'class_names={class_names!r} contains no class names')
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f'class names must be non-empty strings, got {names!r}')
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f'class names {duplicates} occur more than once; each class needs its own name')
    return names


def read_labels(path: str | Path, num_classes: int) -> dict[int, int]:
    """Return {sample index: class index} from a JSON file with a 'samples' list.

    Each entry of 'samples' has 'index' (the sample's position in the MDS folder) and
    'label' (the class index), the format of the demo's `val_classes.json`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'labels file {path} was not found; write it or read labels from an MDS column')
    content = json.loads(path.read_text(encoding='utf-8'))
    samples = content.get('samples') if isinstance(content, dict) else None
    if not isinstance(samples, list):
        raise ValueError(f"{path} has no 'samples' list; write {{'samples': [{{'index': 0, 'label': 3}}, ...]}}")

    labels = {}
    for entry in samples:
        index, label = int(entry['index']), int(entry['label'])
        if not 0 <= label < num_classes:
            raise ValueError(f'{path}: sample {index} has label {label}, outside the {num_classes} class names')
        labels[index] = label
    return labels


# The evaluation data.


class ZeroShotImageDataset(StreamingDataset):
    """Images and class indices from MDS shards, transformed for each vision tower.

    A sample is `{'images': [Tensor (C, H, W) per vision tower], 'label': int,
    'sample_index': int}`. Towers whose transforms have the same `cache_key` share one
    tensor.

    Args:
        image_transforms: one callable per vision tower, mapping an RGB Pillow image to a tensor.
        labels: {sample index: class index}. When None, the label is read from the column `label_key`.
        label_key: the label column, used when `labels` is None.
        image_key: the column of encoded image bytes.
        **kwargs: keyword arguments of `streaming.StreamingDataset` (`local`, `remote`,
            `split`, `batch_size`, ...).
    """

    def __init__(
        self,
        *,
        image_transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
        labels: Mapping[int, int] | None = None,
        label_key: str = 'label',
        image_key: str = 'image',
        **kwargs: Any,
    ):
        if not image_transforms:
            raise ValueError('image_transforms is empty; pass one transform per vision tower')
        super().__init__(**kwargs)
        self.image_transforms = list(image_transforms)
        self.labels = None if labels is None else dict(labels)
        self.label_key = label_key
        self.image_key = image_key

        if self.labels is not None:
            missing = [index for index in range(self.size) if index not in self.labels]
            if missing:
                raise ValueError(
                    f'the labels name no class for {len(missing)} of the {self.size} samples (first: {missing[:5]}); '
                    f'give every sample of the MDS folder a label'
                )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry=retry)
        sample_index = int(sample_id)

        if self.image_key not in sample:
            raise KeyError(f'sample {sample_index} has no column {self.image_key!r}; it has {sorted(sample)}')
        if self.labels is not None:
            label = self.labels[sample_index]
        elif self.label_key in sample:
            label = int(sample[self.label_key])
        else:
            raise KeyError(
                f'sample {sample_index} has no column {self.label_key!r} and no labels file was given; '
                f'set label_key to the label column or pass labels'
            )

        value = sample[self.image_key]
        image = convert_to_rgb(value) if isinstance(value, Image.Image) else decode_image(bytes(value))

        # Evaluation transforms are deterministic, so towers with equal settings share one tensor.
        tensors: dict[Any, torch.Tensor] = {}
        images = []
        for transform in self.image_transforms:
            key = getattr(transform, 'cache_key', None) or id(transform)
            if key not in tensors:
                tensors[key] = transform(image)
            images.append(tensors[key])
        return {'images': images, 'label': label, 'sample_index': sample_index}


def collate_images_and_labels(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of `ZeroShotImageDataset` into `{'images': [(batch, C, H, W)], 'label': (batch,), 'sample_index': (batch,)}`."""
    num_towers = len(samples[0]['images'])
    return {
        'images': [torch.stack([sample['images'][tower] for sample in samples]) for tower in range(num_towers)],
        'label': torch.tensor([sample['label'] for sample in samples], dtype=torch.long),
        'sample_index': torch.tensor([sample['sample_index'] for sample in samples], dtype=torch.long),
    }


def build_zero_shot_dataloader(
    vision_encoders: Sequence[nn.Module],
    batch_size: int,
    *,
    local: str,
    remote: str | None = None,
    split: str | None = None,
    labels: Mapping[int, int] | None = None,
    label_key: str = 'label',
    image_key: str = 'image',
    num_workers: int = 0,
) -> DataLoader:
    """Build the loader of labelled images, with each vision tower's evaluation transform.

    `local` is the MDS folder itself when `remote` is None. Otherwise it is a download
    cache of its own (not the cache of another loader).
    """
    dataset = ZeroShotImageDataset(
        image_transforms=[build_image_transform(encoder.preprocess_cfg, is_train=False) for encoder in vision_encoders],
        labels=labels,
        label_key=label_key,
        image_key=image_key,
        local=local,
        remote=remote,
        split=split,
        batch_size=batch_size,
        shuffle=False,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_images_and_labels,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


# The evaluation.


@dataclasses.dataclass
class ZeroShotResult:
    """Accuracies of one zero-shot evaluation, and the predictions they count, over all ranks.

    Attributes:
        metrics: accuracy per metric name, `top<k>/<view>`.
        sample_index: (samples,) dataset indices, ascending; each sample counts once.
        labels: (samples,) true class indices.
        predictions: per view, (samples, k) class indices ordered by similarity, best first.
    """

    metrics: dict[str, float]
    sample_index: torch.Tensor
    labels: torch.Tensor
    predictions: dict[str, torch.Tensor]

    @property
    def num_samples(self) -> int:
        return len(self.sample_index)


def aggregate_side(loss_fn: nn.Module, side: str, features: list[torch.Tensor]) -> torch.Tensor:
    """Combine one side's normalised tower features as the loss does; one tower's features pass through."""
    if isinstance(loss_fn, MultiEncoderClipLoss):
        return loss_fn.aggregate_vision(features) if side == 'vision' else loss_fn.aggregate_text(features)
    multi_side = 'vision' if loss_fn.text_to_multi_vision else 'text'
    if side == multi_side:
        return loss_fn.aggregate(features)
    return features[0]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Restoring module by module leaves the layers that a tower keeps in eval mode during
    training (frozen batch norm statistics) in eval mode.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextlib.contextmanager
def gathered_root_parameters(model: nn.Module) -> Iterator[None]:
    """All-gather the parameters of the model's root FSDP2 unit for calls that bypass the model's forward.

    Composer shards the model's repeated blocks as units of their own, and those gather
    their weights whenever they are called. The rest of each tower (stems, projections)
    belongs to the root unit, which gathers only in the model's own forward.
    """
    if not isinstance(model, FSDPModule):
        yield
        return

    # NOTE: FSDP2 (torch 2.7) decides which unit is the root at the first forward call. Calling
    # a block first would make it a root of its own and break the next forward of the model.
    if model._get_fsdp_state()._is_root is None:
        raise RuntimeError(
            'the FSDP2-sharded model has not run a forward pass yet, so its root unit is not initialised; '
            'run zero-shot evaluation after training or evaluation steps'
        )
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def tokenize_prompts(text_towers: Sequence[nn.Module], prompts: list[str]) -> list[torch.Tensor]:
    """Return each text tower's (prompts, context_length) token ids, from the tower's own tokenizer."""
    return [torch.as_tensor(tower.get_tokenizer()(prompts)).long() for tower in text_towers]


def encode_class_prompts(
    model: nn.Module,
    loss_fn: nn.Module,
    prompt_tokens: list[torch.Tensor],
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Return the normalised prompt features per text view: `text_j` with several towers, and `aggregate`.

    Args:
        prompt_tokens: one (prompts, context_length) tensor per text tower, from `tokenize_prompts`.
    """
    num_prompts = len(prompt_tokens[0])
    chunks: dict[str, list[torch.Tensor]] = {}

    for start in range(0, num_prompts, batch_size):
        tokens = [tower_tokens[start:start + batch_size].to(device) for tower_tokens in prompt_tokens]
        features = [tower_features.float() for tower_features in model.encode_texts(tokens, normalize=True)]

        views = {'aggregate': aggregate_side(loss_fn, 'text', features).float()}
        if len(features) > 1:
            views.update({f'text_{j}': tower_features for j, tower_features in enumerate(features)})
        for view, view_features in views.items():
            chunks.setdefault(view, []).append(view_features)

    return {view: torch.cat(parts) for view, parts in chunks.items()}


def build_classifiers(prompt_features: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Average each class's prompt features and normalise: one (classes, dim) classifier per text view."""
    classifiers = {}
    for view, features in prompt_features.items():
        per_class = features.reshape(num_classes, -1, features.shape[-1]).mean(dim=1)
        classifiers[view] = F.normalize(per_class, dim=-1)
    return classifiers


def classify_images(
    model: nn.Module,
    loss_fn: nn.Module,
    images: list[torch.Tensor],
    classifiers: dict[str, torch.Tensor],
    top_k: int,
) -> dict[str, torch.Tensor]:
    """Return, per view, the (batch, top_k) class indices of highest cosine similarity."""
    vision = [tower_features.float() for tower_features in model.encode_images(images, normalize=True)]
    vision_aggregate = aggregate_side(loss_fn, 'vision', vision).float()

    pairs = {}
    if len(vision) > 1:
        pairs.update({f'vision_{i}': (features, classifiers['aggregate']) for i, features in enumerate(vision)})
    pairs.update({view: (vision_aggregate, classifier) for view, classifier in classifiers.items() if view != 'aggregate'})
    pairs['aggregate'] = (vision_aggregate, classifiers['aggregate'])

    return {view: (features @ classifier.T).topk(top_k, dim=-1).indices for view, (features, classifier) in pairs.items()}


def _next_batches(dataloader: DataLoader, device: torch.device) -> Iterator[tuple[dict[str, Any], bool]]:
    """Yield (batch, counts) in lockstep over the ranks until every rank has run out of batches.

    FSDP2 all-gathers weights inside every forward, so all ranks must run the same number of
    forwards. A rank that runs out first repeats its last batch with counts=False.
    """
    world_size = dist.get_world_size()
    iterator = iter(dataloader)
    last_batch = None

    while True:
        batch = next(iterator, None)
        if world_size > 1:
            status = torch.tensor(
                [batch is not None, batch is not None or last_batch is not None], dtype=torch.int64, device=device
            )
            dist.all_reduce(status, reduce_operation='SUM')
            has_batch, can_run = status.tolist()
            if has_batch == 0:
                return
            if can_run < world_size:
                raise RuntimeError(
                    f'{world_size - can_run} of {world_size} ranks got no zero-shot batch while others did; '
                    f'use more evaluation samples than ranks'
                )
        elif batch is None:
            return

        if batch is None:
            # NOTE: the tests cover only equal batch counts, which Streaming gives every rank.
            yield last_batch, False
        else:
            last_batch = batch
            yield batch, True


def _gather_predictions(records: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Concatenate the records of every rank, keeping each sample index once, in ascending order.

    Streaming repeats samples to give every rank the same number, so duplicates are dropped.
    """
    local = {
        'sample_index': torch.cat([record['sample_index'] for record in records]),
        'label': torch.cat([record['label'] for record in records]),
        'predictions': {
            view: torch.cat([record['predictions'][view] for record in records]) for view in records[0]['predictions']
        },
    }
    gathered = dist.all_gather_object(local) if dist.get_world_size() > 1 else [local]

    sample_index = torch.cat([part['sample_index'] for part in gathered])
    labels = torch.cat([part['label'] for part in gathered])
    views = gathered[0]['predictions']
    predictions = {view: torch.cat([part['predictions'][view] for part in gathered]) for view in views}

    _, first = np.unique(sample_index.numpy(), return_index=True)
    keep = torch.from_numpy(first)
    return {
        'sample_index': sample_index[keep],
        'labels': labels[keep],
        'predictions': {view: view_predictions[keep] for view, view_predictions in predictions.items()},
    }


def evaluate_zero_shot(
    composer_model: nn.Module,
    dataloader: DataLoader,
    class_names: Sequence[str],
    templates: str | Sequence[Template] | None = 'simple',
    text_batch_size: int = 256,
    precision_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prompt_tokens: list[torch.Tensor] | None = None,
) -> ZeroShotResult:
    """Classify every image of `dataloader` among `class_names` and return top-1 and top-5 accuracy per view.

    Runs the model in eval mode under `torch.no_grad` and restores each module's mode
    afterwards. In a distributed run every rank must call it. Each rank classifies its
    part of the data, and the result is the same on every rank and counts each sample
    once. Top-k is left out for k above the number of classes.

    Args:
        composer_model: a `ComposerCLIP` (its `model` and `loss_fn` are used), unsharded or
            sharded by FSDP2 after at least one forward pass.
        dataloader: batches of `collate_images_and_labels`.
        class_names: the names that go into the prompts, in label order.
        templates: see `resolve_templates`.
        text_batch_size: prompts encoded per forward of the text towers.
        precision_context: a context manager factory for the forward passes, such as
            Composer's `get_precision_context`.
        prompt_tokens: the prompts already tokenized by `tokenize_prompts`, to skip tokenizing
            them again at every evaluation; `templates` is then unused.
    """
    model = composer_model.model
    loss_fn = composer_model.loss_fn
    if prompt_tokens is None:
        prompt_tokens = tokenize_prompts(model.text_towers, format_prompts(class_names, resolve_templates(templates)))
    top_k = min(max(TOP_K), len(class_names))
    device = next(composer_model.parameters()).device

    # Iterating a DataLoader draws its seed from the global generator. Restoring the generator
    # keeps the random numbers of training (dropout, for one) the same with or without this evaluation.
    rng_devices = [device] if device.type == 'cuda' else []
    records = []
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), eval_mode(composer_model), \
            gathered_root_parameters(model), precision_context():
        classifiers = build_classifiers(
            encode_class_prompts(model, loss_fn, prompt_tokens, text_batch_size, device), len(class_names)
        )
        for batch, counts in _next_batches(dataloader, device):
            images = [tower_images.to(device) for tower_images in batch['images']]
            predictions = classify_images(model, loss_fn, images, classifiers, top_k)
            if counts:
                records.append({
                    'sample_index': batch['sample_index'].cpu(),
                    'label': batch['label'].cpu(),
                    'predictions': {view: indices.cpu() for view, indices in predictions.items()},
                })
    if not records:
        raise ValueError('the zero-shot dataloader yielded no batches; check that the MDS folder has samples')

    gathered = _gather_predictions(records)
    labels = gathered['labels']
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f'labels range from {labels.min()} to {labels.max()} but there are {len(class_names)} class names')

    metrics = {}
    for k in TOP_K:
        if k > len(class_names):
            continue
        for view, view_predictions in gathered['predictions'].items():
            hits = (view_predictions[:, :k] == labels[:, None]).any(dim=1)
            metrics[f'top{k}/{view}'] = hits.double().mean().item()
    return ZeroShotResult(metrics, gathered['sample_index'], labels, gathered['predictions'])


class ZeroShotClassification(Callback):
    """Evaluate zero-shot classification after every evaluation of the Trainer.

    The accuracies go to Composer's loggers as `zero_shot/top1/<view>` and
    `zero_shot/top5/<view>`, and into `state.eval_metric_values`, where `train.py` finds
    them along with the retrieval metrics. They are logged at `eval_interval` and at the
    end of training, and also after a standalone `Trainer.eval()`.

    Why a callback and not a Composer `Evaluator`: in Composer 0.32.1 an Evaluator runs the
    model's `eval_forward` and `update_metric` on each batch, and `ComposerCLIP` encodes
    image-text pairs there. Zero-shot classification instead encodes the class prompts once
    per evaluation and then only images, so it would need a second batch format in
    `ComposerCLIP`. The callback runs its own loop over its own data, on every rank at
    once, which FSDP2's all-gathers require.

    Args:
        dataloader: batches of `collate_images_and_labels`, such as from `build_zero_shot_dataloader`.
        class_names: class names in label order.
        templates: see `resolve_templates`.
        text_batch_size: prompts encoded per forward of the text towers.

    Attributes:
        result: the `ZeroShotResult` of the latest evaluation, None before the first.
    """

    def __init__(
        self,
        dataloader: DataLoader,
        class_names: Sequence[str],
        templates: str | Sequence[Template] | None = 'simple',
        text_batch_size: int = 256,
    ):
        self.dataloader = dataloader
        self.class_names = list(class_names)
        self.templates = resolve_templates(templates)
        self.text_batch_size = text_batch_size
        self.result: ZeroShotResult | None = None
        self._prompt_tokens: list[torch.Tensor] | None = None

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._evaluate(state, logger)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        self._evaluate(state, logger)

    def _evaluate(self, state: State, logger: Logger) -> None:
        composer_model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        if self._prompt_tokens is None:
            prompts = format_prompts(self.class_names, self.templates)
            self._prompt_tokens = tokenize_prompts(composer_model.model.text_towers, prompts)

        result = evaluate_zero_shot(
            composer_model,
            self.dataloader,
            self.class_names,
            text_batch_size=self.text_batch_size,
            precision_context=lambda: get_precision_context(state.precision, state.precision_config),
            prompt_tokens=self._prompt_tokens,
        )
        self.result = result

        metrics = {f'zero_shot/{name}': value for name, value in result.metrics.items()}
        logger.log_metrics(metrics)
        state.eval_metric_values.update(metrics)
        log.info(
            'Zero-shot classification of %d images among %d classes at batch %d: %s', result.num_samples,
            len(self.class_names), int(state.timestamp.batch),
            ', '.join(f'{name} {value:.4f}' for name, value in sorted(result.metrics.items())),
        )


def build_zero_shot_callback(
    section: Mapping[str, Any],
    vision_encoders: Sequence[nn.Module],
    default_batch_size: int,
) -> ZeroShotClassification:
    """Build the callback from a recipe's `zero_shot` section.

    Keys:
        local: the MDS folder (required), or the download cache when `remote` is set.
        remote, split: as in a data loader section.
        class_names: a list or a file (required, see `read_class_names`).
        labels: a JSON file of per-sample labels (see `read_labels`). Without it the labels
            come from the MDS column `label_key` (default 'label').
        image_key: the image column (default 'image').
        templates: see `resolve_templates` (default 'simple').
        batch_size: images and prompts per forward (default `default_batch_size`).
        num_workers: DataLoader worker processes (default 0).
    """
    section = dict(section)
    unknown = sorted(set(section) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f'unknown keys {unknown} in zero_shot; valid keys: {list(CONFIG_KEYS)}')
    for key in ('local', 'class_names'):
        if not section.get(key):
            raise ValueError(f'zero_shot.{key} is missing; the zero_shot section needs local and class_names')

    class_names = read_class_names(section['class_names'])
    labels = read_labels(section['labels'], len(class_names)) if section.get('labels') else None
    batch_size = int(section.get('batch_size') or default_batch_size)
    if batch_size < 1:
        raise ValueError(f'zero_shot.batch_size={batch_size} is invalid; use at least 1')

    dataloader = build_zero_shot_dataloader(
        vision_encoders,
        batch_size,
        local=section['local'],
        remote=section.get('remote'),
        split=section.get('split'),
        labels=labels,
        label_key=section.get('label_key', 'label'),
        image_key=section.get('image_key', 'image'),
        num_workers=section.get('num_workers', 0),
    )
    num_samples = dataloader.dataset.size
    log.info(
        'Zero-shot classification over %d classes and %d images of %s, %d samples per batch', len(class_names),
        num_samples, section.get('remote') or section['local'], batch_size,
    )
    return ZeroShotClassification(dataloader, class_names, section.get('templates', 'simple'), batch_size)
