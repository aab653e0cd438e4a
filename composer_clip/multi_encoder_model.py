"""CLIP models with one or several encoders on each side.

The encoders are any `nn.Module` whose `forward` maps a batch to (batch, embed_dim)
features, `BaseVisionEncoder` and `BaseTextEncoder` subclasses among them. Towers may
need different inputs (image sizes, normalisation, tokenizers), so every model takes
either one tensor shared by all towers of a side or a sequence with one tensor per tower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)

Inputs = torch.Tensor | Sequence[torch.Tensor]


def check_output_dim(encoder: nn.Module, embed_dim: int, name: str) -> None:
    """Raise when an encoder's `output_dim` attribute differs from the shared `embed_dim`."""
    output_dim = getattr(encoder, 'output_dim', None)
    if output_dim is not None and output_dim != embed_dim:
        raise ValueError(
            f'{name} ({type(encoder).__name__}) has output_dim={output_dim} but embed_dim={embed_dim}; '
            f'build the encoder with output_dim={embed_dim} or set embed_dim={output_dim}'
        )


def check_encoder(encoder: nn.Module, name: str) -> None:
    """Raise when `encoder` is not a module with its own `forward`."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f'{name} is a {type(encoder).__name__}, not an nn.Module; pass an encoder module')
    if type(encoder).forward is nn.Module.forward:
        raise TypeError(
            f'{name} ({type(encoder).__name__}) does not define forward; '
            f'implement forward(x) returning (batch, output_dim) features'
        )


def split_inputs(inputs: Inputs, num_towers: int, side: str) -> list[torch.Tensor]:
    """Return one input tensor per tower from a shared tensor or a per-tower sequence."""
    if isinstance(inputs, torch.Tensor):
        return [inputs] * num_towers
    inputs = list(inputs)
    if len(inputs) != num_towers:
        kind = 'image' if side == 'vision' else 'text'
        raise ValueError(
            f'{len(inputs)} {kind} inputs were passed for {num_towers} {side} encoders; '
            f'pass one tensor shared by all towers or one tensor per tower'
        )
    return inputs


def encode_features(encoder: nn.Module, inputs: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Run one tower and return its (batch, dim) features, dropping tokens if it returns them."""
    features = encoder(inputs)
    if isinstance(features, tuple):
        features = features[0]
    return F.normalize(features, dim=-1) if normalize else features


class MultiEncoderCLIPBase(nn.Module):
    """Shared parts of the multi-encoder models: towers, `logit_scale`, input handling.

    Args:
        vision_encoders: the vision towers, in order.
        text_encoders: the text towers, in order.
        embed_dim: dimension of the shared embedding space; every tower must output it.
        output_dict: return a dictionary from `forward` (else a tuple in the same order).
    """

    def __init__(
        self,
        vision_encoders: Sequence[nn.Module],
        text_encoders: Sequence[nn.Module],
        embed_dim: int = 512,
        output_dict: bool = True,
    ):
        super().__init__()
        if len(vision_encoders) == 0 or len(text_encoders) == 0:
            raise ValueError(
                f'got {len(vision_encoders)} vision and {len(text_encoders)} text encoders; '
                f'pass at least one of each'
            )
        for side, encoders in (('vision', vision_encoders), ('text', text_encoders)):
            for index, encoder in enumerate(encoders):
                check_encoder(encoder, f'{side} encoder {index}')
                check_output_dim(encoder, embed_dim, f'{side} encoder {index}')

        self.embed_dim = embed_dim
        self.output_dict = output_dict
        self.vision_towers = nn.ModuleList(vision_encoders)
        self.text_towers = nn.ModuleList(text_encoders)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @property
    def num_vision_encoders(self) -> int:
        return len(self.vision_towers)

    @property
    def num_text_encoders(self) -> int:
        return len(self.text_towers)

    def encode_images(self, images: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per vision tower."""
        inputs = split_inputs(images, self.num_vision_encoders, 'vision')
        return [encode_features(tower, x, normalize) for tower, x in zip(self.vision_towers, inputs)]

    def encode_texts(self, texts: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per text tower."""
        inputs = split_inputs(texts, self.num_text_encoders, 'text')
        return [encode_features(tower, x, normalize) for tower, x in zip(self.text_towers, inputs)]

    def scale(self) -> torch.Tensor:
        """Return exp(logit_scale) as a 0-dim tensor, with the log scale capped at ln(100) as in CLIP.

        FSDP2 stores `logit_scale` with shape [1] because fully_shard rejects 0-dim parameters
        (torch 2.7); the reshape keeps the result a scalar either way.
        """
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the stored log scale into [0, ln(100)]; call after each optimizer step."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def _pack(self, outputs: dict[str, torch.Tensor | list[torch.Tensor]]):
        return outputs if self.output_dict else tuple(outputs.values())


class MultiVisionCLIP(MultiEncoderCLIPBase):
    """CLIP with one text tower and N vision towers.

    `forward` returns `{'text_features': (B, D), 'vision_features_list': [(B, D)] * N,
    'logit_scale': scalar}` with normalised features and the exponentiated scale.
    """

    def __init__(
        self,
        vision_encoders: Sequence[nn.Module],
        text_encoder: nn.Module,
        embed_dim: int = 512,
        output_dict: bool = True,
    ):
        super().__init__(vision_encoders, [text_encoder], embed_dim, output_dict)

    @property
    def visual(self) -> nn.ModuleList:
        return self.vision_towers

    @property
    def text(self) -> nn.Module:
        return self.text_towers[0]

    def encode_image(self, images: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per vision tower."""
        return self.encode_images(images, normalize)

    def encode_text(self, texts: Inputs, normalize: bool = False) -> torch.Tensor:
        """Return the (batch, embed_dim) features of the text tower."""
        return self.encode_texts(texts, normalize)[0]

    def forward(self, images: Inputs, texts: Inputs):
        return self._pack({
            'text_features': self.encode_text(texts, normalize=True),
            'vision_features_list': self.encode_image(images, normalize=True),
            'logit_scale': self.scale(),
        })


class MultiTextCLIP(MultiEncoderCLIPBase):
    """CLIP with one vision tower and N text towers.

    Each text tower may have its own tokenizer: pass one token tensor per tower.
    `forward` returns `{'vision_features': (B, D), 'text_features_list': [(B, D)] * N,
    'logit_scale': scalar}` with normalised features and the exponentiated scale.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        text_encoders: Sequence[nn.Module],
        embed_dim: int = 512,
        output_dict: bool = True,
    ):
        super().__init__([vision_encoder], text_encoders, embed_dim, output_dict)

    @property
    def visual(self) -> nn.Module:
        return self.vision_towers[0]

    @property
    def text(self) -> nn.ModuleList:
        return self.text_towers

    def encode_image(self, images: Inputs, normalize: bool = False) -> torch.Tensor:
        """Return the (batch, embed_dim) features of the vision tower."""
        return self.encode_images(images, normalize)[0]

    def encode_text(self, texts: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per text tower."""
        return self.encode_texts(texts, normalize)

    def forward(self, images: Inputs, texts: Inputs):
        return self._pack({
            'vision_features': self.encode_image(images, normalize=True),
            'text_features_list': self.encode_text(texts, normalize=True),
            'logit_scale': self.scale(),
        })


class MultiEncoderCLIP(MultiEncoderCLIPBase):
    """CLIP with M vision towers and N text towers.

    `forward` returns `{'vision_features_list': [(B, D)] * M, 'text_features_list':
    [(B, D)] * N, 'logit_scale': scalar}` with normalised features and the
    exponentiated scale.
    """

    @property
    def visual(self) -> nn.ModuleList:
        return self.vision_towers

    @property
    def text(self) -> nn.ModuleList:
        return self.text_towers

    def encode_image(self, images: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per vision tower."""
        return self.encode_images(images, normalize)

    def encode_text(self, texts: Inputs, normalize: bool = False) -> list[torch.Tensor]:
        """Return one (batch, embed_dim) feature tensor per text tower."""
        return self.encode_texts(texts, normalize)

    def forward(self, images: Inputs, texts: Inputs):
        return self._pack({
            'vision_features_list': self.encode_image(images, normalize=True),
            'text_features_list': self.encode_text(texts, normalize=True),
            'logit_scale': self.scale(),
        })


def features_by_side(model: MultiEncoderCLIPBase, outputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return the (vision, text) feature lists of any multi-encoder model's `forward` output."""
    if not isinstance(outputs, dict):
        outputs = dict(zip(_OUTPUT_KEYS[type(model)], outputs))
    vision = outputs['vision_features_list'] if 'vision_features_list' in outputs else [outputs['vision_features']]
    text = outputs['text_features_list'] if 'text_features_list' in outputs else [outputs['text_features']]
    return list(vision), list(text)


_OUTPUT_KEYS = {
    MultiVisionCLIP: ('text_features', 'vision_features_list', 'logit_scale'),
    MultiTextCLIP: ('vision_features', 'text_features_list', 'logit_scale'),
    MultiEncoderCLIP: ('vision_features_list', 'text_features_list', 'logit_scale'),
}


def export_tower_state_dict(model: MultiEncoderCLIPBase, side: str, index: int = 0) -> dict[str, torch.Tensor]:
    """Export one tower and the shared `logit_scale` as a plain state dict.

    Keys follow OpenCLIP's CLIP models: the vision tower under `visual.`, a text tower
    under `text.`, and `logit_scale` as a 0-dim tensor. A tower built from OpenCLIP's
    classes (`TimmModel`, `HFTextEncoder`, ...) therefore loads into an OpenCLIP model
    of the same configuration with `load_state_dict(..., strict=False)`.

    Args:
        model: a trained multi-encoder model (unsharded).
        side: 'vision' or 'text'.
        index: which tower of that side.
    """
    if side not in ('vision', 'text'):
        raise ValueError(f"side={side!r} is invalid; pass 'vision' or 'text'")
    towers = model.vision_towers if side == 'vision' else model.text_towers
    if not 0 <= index < len(towers):
        raise ValueError(f'index={index} is out of range; the model has {len(towers)} {side} towers')

    prefix = 'visual.' if side == 'vision' else 'text.'
    state_dict = {prefix + key: value.detach().clone() for key, value in towers[index].state_dict().items()}
    state_dict['logit_scale'] = model.logit_scale.detach().clone().reshape(())
    return state_dict
