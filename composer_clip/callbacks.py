"""Composer callbacks of composer_clip."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

from composer_clip.multi_encoder_model import MAX_LOGIT_SCALE


class ClampLogitScale(Callback):
    """Keep every `logit_scale` parameter within [0, ln(100)] after each optimizer step.

    CLIP caps the learned temperature at 100; without the cap it grows until the loss
    saturates. The models also cap the scale in `forward`, so a value above the cap gets
    no gradient, but clamping the stored parameter keeps checkpoints within range too.
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        for name, parameter in state.model.named_parameters():
            if name.rsplit('.', 1)[-1] == 'logit_scale':
                parameter.data.clamp_(0, MAX_LOGIT_SCALE)
