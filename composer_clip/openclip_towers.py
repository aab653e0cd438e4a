"""OpenCLIP's native ViT and text transformer as base-class encoders, and towers taken from OpenCLIP models.

`OpenCLIPVisionTransformer` and `OpenCLIPTextTransformer` subclass `open_clip.transformer.VisionTransformer`
and `open_clip.transformer.TextTransformer`, so they take OpenCLIP's arguments and keep OpenCLIP's
state-dict keys. `vision_tower_from_openclip` and `text_tower_from_openclip` build a whole model
with `open_clip.create_model` and return one of its towers, with its trained weights, as such an
encoder.
"""

import logging
from typing import Any, Dict, List, Optional

import torch
from open_clip.transformer import TextTransformer, Transformer, VisionTransformer
from torch import nn

from composer_clip.base_model import (
    BaseTextEncoder,
    BaseVisionEncoder,
    _check_count,
    default_preprocess_cfg,
    is_norm_layer,
)

logger = logging.getLogger(__name__)

# Keys of `open_clip.transform.PreprocessCfg` that a vision encoder's `preprocess_cfg` carries.
_PREPROCESS_KEYS = ('size', 'mean', 'std', 'interpolation', 'resize_mode', 'fill_color')


def _preprocess_cfg_from_openclip(openclip_cfg: Optional[Dict[str, Any]], image_size) -> Dict[str, Any]:
    """Return the encoder's preprocessing settings from an OpenCLIP preprocess config.

    `size` always follows the tower's `image_size`. Missing keys, or a missing config, fall back to
    OpenAI CLIP's settings.
    """
    height, width = image_size
    size = height if height == width else (height, width)
    cfg = default_preprocess_cfg(size)
    for key in _PREPROCESS_KEYS[1:]:
        if openclip_cfg and openclip_cfg.get(key) is not None:
            cfg[key] = openclip_cfg[key]

    cfg['mean'] = tuple(float(value) for value in cfg['mean'])
    cfg['std'] = tuple(float(value) for value in cfg['std'])
    return cfg


def _adopt(cls, tower: nn.Module):
    """Return an instance of `cls` that shares the modules, parameters and attributes of `tower`.

    `cls` subclasses the tower's class, so the instance has the same state-dict keys and forward.
    No tensor is copied: training the returned encoder trains the tower.
    """
    encoder = cls.__new__(cls)
    encoder.__dict__.update(tower.__dict__)
    return encoder


class OpenCLIPVisionTransformer(BaseVisionEncoder, VisionTransformer):
    """OpenCLIP's ViT (`open_clip.transformer.VisionTransformer`) as a `BaseVisionEncoder`.

    The arguments are OpenCLIP's. Keyword arguments not listed here (`ls_init_value`, `pool_type`,
    `attentional_pool`, `patch_dropout`, `act_layer`, `norm_layer`, ...) go to OpenCLIP unchanged.
    The state-dict keys (`conv1.`, `transformer.resblocks.N.`, `ln_post.`, `proj`) are OpenCLIP's,
    so the weights of an OpenCLIP model's `visual` tower load unchanged.

    `output_tokens=True` also returns OpenCLIP's tokens: the patch tokens `(batch, grid * grid,
    width)` after `ln_post`, without the class token. Preprocessing defaults to OpenAI CLIP's mean
    and std, bicubic resizing of the shortest side, at `image_size`.
    """

    def __init__(
            self,
            image_size: int = 224,
            patch_size: int = 16,
            width: int = 768,
            layers: int = 12,
            heads: int = 12,
            mlp_ratio: float = 4.0,
            output_dim: int = 512,
            output_tokens: bool = False,
            **kwargs,
    ):
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f'output_dim={output_dim!r} is invalid; pass a positive integer')

        # BaseVisionEncoder.__init__ would reach OpenCLIP's __init__ through super() without its
        # arguments, so OpenCLIP's __init__ runs directly and the base attributes are set below.
        VisionTransformer.__init__(
            self,
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=mlp_ratio,
            output_dim=output_dim,
            output_tokens=output_tokens,
            **kwargs,
        )
        self.preprocess_cfg = _preprocess_cfg_from_openclip(None, self.image_size)

        logger.info(
            'Built OpenCLIPVisionTransformer (image_size=%s, patch_size=%s, width=%d, layers=%d, output_dim=%d)',
            self.image_size, self.patch_size, width, layers, output_dim)

    @classmethod
    def from_openclip(cls, tower: VisionTransformer, output_tokens: bool = False) -> 'OpenCLIPVisionTransformer':
        """Wrap a built OpenCLIP `VisionTransformer` (for example `model.visual`) without copying its weights.

        The encoder shares the tower's parameters. Its preprocessing comes from the tower's
        `preprocess_cfg`, which `open_clip.create_model` sets from the pretrained config.
        """
        if not isinstance(tower, VisionTransformer):
            raise TypeError(
                f'tower is a {type(tower).__name__}, not an open_clip.transformer.VisionTransformer; '
                'pass the visual tower of an OpenCLIP ViT model')

        encoder = _adopt(cls, tower)
        encoder.output_tokens = output_tokens
        encoder.preprocess_cfg = _preprocess_cfg_from_openclip(getattr(tower, 'preprocess_cfg', None), tower.image_size)
        return encoder

    def forward(self, images: torch.Tensor):
        """Encode images `(batch, 3, height, width)` into `(batch, output_dim)` features (OpenCLIP's forward)."""
        return VisionTransformer.forward(self, images)

    def block_modules(self) -> List[nn.Module]:
        """Return the residual attention blocks `transformer.resblocks`."""
        return list(self.transformer.resblocks)

    def _head_modules(self) -> List[nn.Module]:
        """Return the modules after the blocks: the attention poolers and `ln_post`."""
        names = ('attn_pool', 'attn_pool_contrastive', 'ln_post')
        return [getattr(self, name) for name in names if getattr(self, name, None) is not None]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze everything except the last `unlocked_groups` blocks and, when one is unlocked, the head.

        The head is `ln_post`, the attention poolers and `proj`. With `unlocked_groups=0` every
        parameter is frozen, as in OpenCLIP. Unlike OpenCLIP's `lock`, which counts the stem and
        the projection as groups of their own, `unlocked_groups` counts blocks, as
        `get_num_layers()` does. The ViT has no batch norm, so `freeze_bn_stats` changes nothing.
        """
        blocks = self.block_modules()
        _check_count('unlocked_groups', unlocked_groups, len(blocks))

        self.requires_grad_(False)
        if unlocked_groups:
            for module in blocks[len(blocks) - unlocked_groups:] + self._head_modules():
                module.requires_grad_(True)
            if self.proj is not None:
                self.proj.requires_grad_(True)

        if freeze_bn_stats:
            self.freeze_batch_norm_stats()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each block through OpenCLIP's non-reentrant checkpointing."""
        self.transformer.grad_checkpointing = enable


class OpenCLIPTextTransformer(BaseTextEncoder, TextTransformer):
    """OpenCLIP's text transformer (`open_clip.transformer.TextTransformer`) as a `BaseTextEncoder`.

    The arguments are OpenCLIP's. Keyword arguments not listed here (`pool_type`, `proj_type`,
    `embed_cls`, `no_causal_mask`, `pad_id`, `act_layer`, ...) go to OpenCLIP unchanged. The
    state-dict keys (`token_embedding.`, `positional_embedding`, `transformer.resblocks.N.`,
    `ln_final.`, `text_projection`) are OpenCLIP's.

    The tokenizer is CLIP's byte-pair encoding (`open_clip.tokenizer.SimpleTokenizer`) padded with
    id 0 to `context_length`, or for a tower taken from a named OpenCLIP model,
    `open_clip.get_tokenizer(model_name)`. `pad_id` is OpenCLIP's `pad_id` (default 0). With
    `output_dim=None` or `proj_type='none'` there is no projection, and `output_dim` is `width`.
    `output_tokens=True` also returns the token features `(batch, context_length, width)` after
    `ln_final`.
    """

    def __init__(
            self,
            context_length: int = 77,
            vocab_size: int = 49408,
            width: int = 512,
            heads: int = 8,
            layers: int = 12,
            mlp_ratio: float = 4.0,
            output_dim: Optional[int] = 512,
            output_tokens: bool = False,
            **kwargs,
    ):
        if output_dim is not None and (not isinstance(output_dim, int) or output_dim <= 0):
            raise ValueError(
                f'output_dim={output_dim!r} is invalid; pass a positive integer, or None for no projection')

        # BaseTextEncoder.__init__ would reach OpenCLIP's __init__ through super() without its
        # arguments, so OpenCLIP's __init__ runs directly and the base attributes are set below.
        TextTransformer.__init__(
            self,
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=mlp_ratio,
            output_dim=output_dim,
            output_tokens=output_tokens,
            **kwargs,
        )
        self._set_base_attributes(tokenizer_name=None)

        logger.info(
            'Built OpenCLIPTextTransformer (context_length=%d, vocab_size=%d, width=%d, layers=%d, output_dim=%d)',
            self.context_length, self.vocab_size, width, layers, self.output_dim)

    def _set_base_attributes(self, tokenizer_name: Optional[str]) -> None:
        # OpenCLIP keeps output_dim even when it builds no projection, so the features are `width` wide.
        if self.text_projection is None:
            self.output_dim = self.width
        self.tokenizer_name = tokenizer_name

    @classmethod
    def from_openclip(
            cls,
            tower: TextTransformer,
            output_tokens: bool = False,
            tokenizer_name: Optional[str] = None,
    ) -> 'OpenCLIPTextTransformer':
        """Wrap a built OpenCLIP `TextTransformer` (for example `model.text`) without copying its weights.

        The encoder shares the tower's parameters. `tokenizer_name` is an OpenCLIP model name for
        `open_clip.get_tokenizer`; None means CLIP's byte-pair tokenizer.
        """
        if not isinstance(tower, TextTransformer):
            raise TypeError(
                f'tower is a {type(tower).__name__}, not an open_clip.transformer.TextTransformer; '
                'pass model.text of an OpenCLIP model, or assemble_clip_text_tower(model) for the CLIP class')

        encoder = _adopt(cls, tower)
        encoder.output_tokens = output_tokens
        encoder._set_base_attributes(tokenizer_name)
        return encoder

    def forward(self, token_ids: torch.Tensor):
        """Encode token ids `(batch, context_length)` into `(batch, output_dim)` features (OpenCLIP's forward)."""
        return TextTransformer.forward(self, token_ids)

    def get_tokenizer(self):
        """Return the tokenizer of the OpenCLIP model this tower came from, or CLIP's byte-pair tokenizer."""
        if self.tokenizer_name is None:
            return BaseTextEncoder.get_tokenizer(self)

        import open_clip

        return open_clip.get_tokenizer(self.tokenizer_name, context_length=self.context_length)

    def block_modules(self) -> List[nn.Module]:
        """Return the residual attention blocks `transformer.resblocks`."""
        return list(self.transformer.resblocks)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze everything except the last `unlocked_layers` blocks and, when one is unlocked, the head.

        The head is `ln_final` and `text_projection`. With `unlocked_layers=0` every parameter is
        frozen, as in OpenCLIP. Unlike OpenCLIP's `lock`, which counts the embeddings and the
        projection as groups of their own, `unlocked_layers` counts blocks, as `get_num_layers()`
        does. With `freeze_layer_norm=False`, which OpenCLIP does not support, the layer norms of
        the frozen part stay trainable.
        """
        blocks = self.block_modules()
        _check_count('unlocked_layers', unlocked_layers, len(blocks))

        self.requires_grad_(False)
        if not freeze_layer_norm:
            for module in self.modules():
                if is_norm_layer(module):
                    module.requires_grad_(True)

        if unlocked_layers:
            for module in blocks[len(blocks) - unlocked_layers:] + [self.ln_final]:
                module.requires_grad_(True)
            if self.text_projection is not None:
                self.text_projection.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each block through OpenCLIP's non-reentrant checkpointing."""
        self.transformer.grad_checkpointing = enable


def assemble_clip_text_tower(model: nn.Module) -> TextTransformer:
    """Return the text tower of OpenCLIP's `CLIP` class as one `TextTransformer` that shares its modules.

    `CLIP` keeps its text tower as separate attributes (`token_embedding`, `positional_embedding`,
    `transformer`, `ln_final`, `text_projection`, `attn_mask`) at the root of the model. OpenCLIP
    builds the `TextTransformer` here on the meta device, so that its own `__init__` sets every
    attribute, and then the model's modules replace the placeholder ones. The result computes
    what `model.encode_text` computes: `CLIP` uses neither a padding mask nor a class embedding.
    """
    projection = model.text_projection
    if projection is None:
        projection_kwargs = {'output_dim': None}
    elif isinstance(projection, nn.Linear):
        projection_kwargs = {'output_dim': projection.out_features, 'proj_bias': projection.bias is not None}
    else:
        projection_kwargs = {'output_dim': projection.shape[1]}

    with torch.device('meta'):
        tower = TextTransformer(
            context_length=model.context_length,
            vocab_size=model.vocab_size,
            width=model.transformer.width,
            heads=model.transformer.resblocks[0].attn.num_heads,
            layers=1,
            pool_type=model.text_pool_type,
            eos_id=model.text_eos_id,
            **projection_kwargs,
        )

    tower.token_embedding = model.token_embedding
    tower.positional_embedding = model.positional_embedding
    tower.transformer = model.transformer
    tower.ln_final = model.ln_final
    tower.text_projection = projection
    tower.attn_mask = model.attn_mask

    placeholders = [name for name, tensor in list(tower.named_parameters()) + list(tower.named_buffers())
                    if tensor.is_meta]
    if placeholders:
        raise RuntimeError(
            f'the CLIP model has no counterpart of the text tower tensors {placeholders} in this open_clip '
            'version; build the model with force_custom_text=True to get its text tower as model.text')
    tower.train(model.training)
    return tower


def _check_tower_output_dim(model_name: str, encoder: nn.Module, output_dim: Optional[int]) -> None:
    if output_dim is not None and encoder.output_dim != output_dim:
        raise ValueError(
            f'the tower of {model_name} outputs {encoder.output_dim} features but output_dim={output_dim} '
            f'was requested; pass output_dim={encoder.output_dim} or None')


def vision_tower_from_openclip(
        model_name: str,
        pretrained: Optional[str] = None,
        output_dim: Optional[int] = None,
        output_tokens: bool = False,
        **kwargs,
) -> OpenCLIPVisionTransformer:
    """Return the trained ViT tower of an OpenCLIP model as an `OpenCLIPVisionTransformer`.

    Args:
        model_name: OpenCLIP model name (`open_clip.list_models()`, a config added with
            `open_clip.add_model_config`, or an `hf-hub:` / `local-dir:` name).
        pretrained: pretrained tag or local checkpoint file; None keeps random weights.
        output_dim: when given, the tower's feature width must equal it.
        output_tokens: also return the patch tokens.
        **kwargs: more arguments of `open_clip.create_model` (`force_image_size`, `precision`,
            `cache_dir`, ...).

    The whole model is built and only its vision tower kept. Preprocessing comes from the
    model's preprocess config (the pretrained tag's mean and std, for example).
    """
    import open_clip

    # The text tower is dropped, so do not load base text weights (HF text towers download them).
    kwargs.setdefault('pretrained_text', False)
    model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)

    tower = model.visual
    if not isinstance(tower, VisionTransformer):
        raise ValueError(
            f'{model_name} has a {type(tower).__name__} vision tower, not OpenCLIP\'s VisionTransformer; '
            'for a timm tower, build composer_clip.timm_model.TimmModel with the same timm settings and '
            'load model.visual.state_dict() into it')

    encoder = OpenCLIPVisionTransformer.from_openclip(tower, output_tokens=output_tokens)
    _check_tower_output_dim(model_name, encoder, output_dim)
    logger.info(
        'Took the vision tower of %s (pretrained=%s): %d blocks, image_size=%s, output_dim=%d',
        model_name, pretrained, encoder.get_num_layers(), encoder.image_size, encoder.output_dim)
    return encoder


def text_tower_from_openclip(
        model_name: str,
        pretrained: Optional[str] = None,
        output_dim: Optional[int] = None,
        output_tokens: bool = False,
        **kwargs,
) -> OpenCLIPTextTransformer:
    """Return the trained text transformer of an OpenCLIP model as an `OpenCLIPTextTransformer`.

    Args:
        model_name: OpenCLIP model name (`open_clip.list_models()`, a config added with
            `open_clip.add_model_config`, or an `hf-hub:` / `local-dir:` name).
        pretrained: pretrained tag or local checkpoint file; None keeps random weights.
        output_dim: when given, the tower's feature width must equal it.
        output_tokens: also return the token features.
        **kwargs: more arguments of `open_clip.create_model` (`force_context_length`,
            `precision`, `cache_dir`, ...).

    The whole model is built and only its text tower kept. `get_tokenizer()` returns
    `open_clip.get_tokenizer(model_name)` at the tower's context length.
    """
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)

    # CustomTextCLIP and CoCa keep the text tower as `model.text`; CLIP spreads it over its root.
    tower = getattr(model, 'text', None)
    if tower is None and isinstance(getattr(model, 'transformer', None), Transformer):
        tower = assemble_clip_text_tower(model)
    if not isinstance(tower, TextTransformer):
        raise ValueError(
            f'{model_name} has a {type(tower).__name__} text tower, not OpenCLIP\'s TextTransformer; '
            'for an HF text tower, build composer_clip.hf_model.HFTextEncoder with the same settings and '
            'load model.text.state_dict() into it')

    encoder = OpenCLIPTextTransformer.from_openclip(tower, output_tokens=output_tokens, tokenizer_name=model_name)
    _check_tower_output_dim(model_name, encoder, output_dim)
    logger.info(
        'Took the text tower of %s (pretrained=%s): %d blocks, context_length=%d, output_dim=%d',
        model_name, pretrained, encoder.get_num_layers(), encoder.context_length, encoder.output_dim)
    return encoder


__all__ = [
    'OpenCLIPTextTransformer',
    'OpenCLIPVisionTransformer',
    'assemble_clip_text_tower',
    'text_tower_from_openclip',
    'vision_tower_from_openclip',
]
