"""Validation of a resolved training config, before anything is built.

Each section's keys are checked against the parameters of the function that receives
them, so a misspelled key fails with the valid keys and the closest match instead of
an error deep inside a constructor. Values are checked against the parameters' type
annotations where those are plain types, and settings that must agree across sections
(tower counts and loss settings, tower output sizes and `model.embed_dim`) are checked
together.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import os
import pathlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from composer.core import Precision, Time
from omegaconf import DictConfig, OmegaConf

from composer_clip.data.bad_samples import check_max_bad_samples
from composer_clip.one_to_many_loss import AGGREGATIONS
from composer_clip.zero_shot import CONFIG_KEYS as ZERO_SHOT_KEYS

__all__ = ['ConfigError', 'check_keys', 'closest_key_hint', 'validate_config']


class ConfigError(ValueError):
    """A training config that cannot run; the message names the key and the fix."""


# Names from other libraries that mean one of our keys but are not spelled close to it.
KEY_ALIASES = {'learning_rate': 'lr', 'warmup': 't_warmup', 'warmup_steps': 't_warmup'}


def closest_key_hint(key: str, valid_keys: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest valid key, or '.' when none is close.

    Either ends a sentence, so a message can go on with the list of valid keys.
    """
    valid_keys = list(valid_keys)
    if KEY_ALIASES.get(key) in valid_keys:
        return f'; did you mean {KEY_ALIASES[key]!r}?'
    matches = difflib.get_close_matches(key, valid_keys, n=1)
    return f'; did you mean {matches[0]!r}?' if matches else '.'


def check_keys(
    where: str,
    given: Mapping[str, Any],
    functions: Iterable[Callable],
    extra_keys: Iterable[str] = (),
    filled_keys: Iterable[str] = (),
    defaulted_keys: Iterable[str] = (),
    forwards_kwargs: bool = True,
) -> None:
    """Check the keys and values of ``given`` against the parameters of ``functions``.

    Args:
        where: the config path of ``given``, used in messages (``'model.text_encoder'``).
        given: the section, as a plain dict.
        functions: the callables that receive the section's keys as keyword arguments.
        extra_keys: further keys the builders read from the section themselves.
        filled_keys: parameters that the builders pass, which the section must not set
            and need not contain.
        defaulted_keys: required parameters that the builders fill in when the section
            leaves them out.
        forwards_kwargs: whether a ``**kwargs`` parameter accepts keys that are not
            checked here. Pass False when every function that receives the forwarded
            keys is in ``functions``.

    Raises:
        ConfigError: on an unknown key (with the valid keys and the closest match), a
            value of the wrong type, or a missing required parameter.
    """
    filled = set(filled_keys)
    defaulted = set(defaulted_keys)
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    accepts_any_key = False
    for function in functions:
        signature = inspect.signature(function)
        function_hints = _type_hints(function)
        for name, parameter in signature.parameters.items():
            if name == 'self' or parameter.kind == inspect.Parameter.VAR_POSITIONAL:
                continue
            if parameter.kind == inspect.Parameter.VAR_KEYWORD:
                accepts_any_key = accepts_any_key or forwards_kwargs
                continue
            parameters.setdefault(name, parameter)
            if name in function_hints:
                hints.setdefault(name, function_hints[name])

    valid_keys = sorted((set(parameters) | set(extra_keys)) - filled)
    for key, value in given.items():
        if key in filled:
            raise ConfigError(f'{where}.{key} is set by composer_clip itself; remove it from the config')
        if key not in parameters and key not in extra_keys and not accepts_any_key:
            raise ConfigError(
                f'unknown key {where}.{key}{closest_key_hint(key, valid_keys)} Valid keys: {valid_keys}'
            )
        required = key in parameters and parameters[key].default is inspect.Parameter.empty
        if value is None and required:
            raise ConfigError(f'{where}.{key} is missing (null); it is required')
        if key in hints and not _matches_type(value, hints[key]):
            raise ConfigError(
                f'{where}.{key}={value!r} has type {type(value).__name__}, expected {_type_name(hints[key])}'
            )

    for name, parameter in parameters.items():
        required = parameter.default is inspect.Parameter.empty and parameter.kind != inspect.Parameter.VAR_KEYWORD
        if required and name not in filled and name not in defaulted and name not in given:
            raise ConfigError(f'{where}.{name} is missing; it is required')


def validate_config(config: DictConfig, yaml_path: str) -> None:
    """Validate a resolved config; raise `ConfigError` naming the first problem found."""
    from composer_clip import builders  # Imported here because builders imports this module.

    values = OmegaConf.to_container(config, resolve=True)
    _check_top_level(values, yaml_path, builders)
    model = values['model']
    tower_counts = _check_model(model, builders)
    _check_loss(values.get('loss') or {}, model.get('name', 'multi_vision'), tower_counts, builders)
    for section in ('train_loader', 'eval_loader'):
        _check_loader(section, values[section], builders)
    if values.get('optimizer') is not None:
        check_keys('optimizer', values['optimizer'], [builders.OPTIMIZER_CLASS], extra_keys=['name'],
                   filled_keys=['params'])
    if values.get('scheduler') is not None:
        check_keys('scheduler', values['scheduler'], [builders.SCHEDULER_CLASS], extra_keys=['name'])
    _check_section_keys('zero_shot', values.get('zero_shot'), ZERO_SHOT_KEYS)
    _check_section_keys('loggers', values.get('loggers'), builders.OPTIONAL_LOGGERS)


# Types of top-level values; keys missing here are checked by their own section or builder.
TOP_LEVEL_TYPES = {
    'variables': dict, 'run_name': str, 'seed': int, 'device': str, 'model': dict, 'loss': dict,
    'train_loader': dict, 'eval_loader': dict, 'global_train_batch_size': int, 'device_eval_batch_size': int,
    'max_duration': (str, int), 'eval_interval': (str, int), 'optimizer': dict, 'scheduler': dict,
    'precision': str, 'save_folder': str, 'save_interval': (str, int), 'save_num_checkpoints_to_keep': int,
    'save_overwrite': bool, 'load_path': str, 'autoresume': bool, 'progress_bar': bool, 'log_to_console': bool,
    'console_log_interval': (str, int), 'metrics_file': str, 'dist_timeout': (int, float),
    'parallelism_config': dict, 'memory_log_interval': int, 'code_paths': list,
}
REQUIRED_TOP_LEVEL_KEYS = ('seed', 'model', 'train_loader', 'eval_loader', 'global_train_batch_size',
                           'max_duration', 'optimizer', 'scheduler')
POSITIVE_TOP_LEVEL_KEYS = ('global_train_batch_size', 'device_eval_batch_size', 'memory_log_interval')
# Top-level keys that hold a Composer time.
TIME_KEYS = ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval')


def _check_top_level(values: dict[str, Any], yaml_path: str, builders: Any) -> None:
    valid_keys = builders.TOP_LEVEL_KEYS
    unknown = sorted(set(values) - valid_keys)
    if unknown:
        hints = [f'{key!r} -> {matches[0]!r}' for key in unknown
                 if (matches := difflib.get_close_matches(key, valid_keys, n=1))]
        hint = f'; closest valid keys: {", ".join(hints)}' if hints else ''
        raise ConfigError(f'unknown top-level keys {unknown} in {yaml_path}{hint}; valid keys: {sorted(valid_keys)}')

    for key in REQUIRED_TOP_LEVEL_KEYS:
        if values.get(key) is None:
            raise ConfigError(f'{key} is missing in {yaml_path}; it is required')
    for key, value in values.items():
        if key in TOP_LEVEL_TYPES and value is not None and not _matches_type(value, TOP_LEVEL_TYPES[key]):
            raise ConfigError(
                f'{key}={value!r} has type {type(value).__name__}, expected {_type_name(TOP_LEVEL_TYPES[key])}'
            )
    for key in POSITIVE_TOP_LEVEL_KEYS:
        if values.get(key) is not None and values[key] < 1:
            raise ConfigError(f'{key}={values[key]} is invalid; it must be at least 1')

    precisions = [precision.value for precision in Precision]
    precision = values.get('precision')
    if precision is not None and precision not in precisions:
        raise ConfigError(f'precision={precision!r} is invalid{closest_key_hint(precision, precisions)} '
                          f'Valid values: {precisions}')
    for key in TIME_KEYS:
        _check_time(key, values.get(key))
    for key in ('t_warmup', 't_max'):
        _check_time(f'scheduler.{key}', (values.get('scheduler') or {}).get(key))


def _check_time(key: str, value: Any) -> None:
    """Raise unless ``value`` is None, an int (epochs, as Composer reads it) or a Composer time string."""
    if value is None or isinstance(value, int):
        return
    try:
        Time.from_timestring(value)
    except ValueError as error:
        raise ConfigError(
            f'{key}={value!r} is not a time: write a number and a unit, such as 10ep (epochs), 500ba (batches), '
            f'1000sp (samples) or 0.1dur (a fraction of max_duration)'
        ) from error


def _check_model(model: dict[str, Any], builders: Any) -> dict[str, int]:
    """Check the model section and its towers; return the number of towers per side."""
    kind = model.get('name', 'multi_vision')
    if kind not in builders.MODEL_KINDS:
        raise ConfigError(f'model.name={kind!r} is invalid{closest_key_hint(kind, builders.MODEL_KINDS)} '
                          f'Valid names: {sorted(builders.MODEL_KINDS)}')
    _, vision_key, text_key = builders.MODEL_KINDS[kind]
    valid_keys = ['name', 'embed_dim', vision_key, text_key]
    for key in model:
        if key not in valid_keys:
            raise ConfigError(f'unknown key model.{key} for model.name={kind!r}{closest_key_hint(key, valid_keys)} '
                              f'Valid keys: {valid_keys}')
    embed_dim = model.get('embed_dim')
    if embed_dim is None:
        raise ConfigError('model.embed_dim is missing; it is required')
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ConfigError(f'model.embed_dim={embed_dim!r} is invalid; it must be a positive int')

    counts = {}
    for side, key in (('vision', vision_key), ('text', text_key)):
        if model.get(key) is None:
            raise ConfigError(f'model.{key} is missing; model.name={kind!r} requires it')
        if key.endswith('s'):
            towers = model[key]
            if not isinstance(towers, list) or not towers:
                raise ConfigError(f'model.{key} must be a non-empty list of encoder configs, got {towers!r}')
            for index, tower in enumerate(towers):
                _check_encoder(f'model.{key}[{index}]', tower, embed_dim, builders)
            counts[side] = len(towers)
        else:
            _check_encoder(f'model.{key}', model[key], embed_dim, builders)
            counts[side] = 1
    return counts


def _check_encoder(where: str, tower: Any, embed_dim: int, builders: Any) -> None:
    if not isinstance(tower, dict):
        raise ConfigError(f'{where} must be an encoder config (a mapping with a name), got {tower!r}')
    registered = sorted(builders.encoders.get_all())
    name = tower.get('name')
    if name is None:
        raise ConfigError(f'{where}.name is missing; set it to one of {registered}')
    if name not in registered:
        raise ConfigError(f'{where}.name={name!r} is not a registered encoder{closest_key_hint(name, registered)} '
                          f'Registered: {registered}. For your own encoder, list the file that registers it '
                          f'under code_paths')

    constructor = builders.encoders.get(name)
    arguments = {key: value for key, value in tower.items() if key not in ('name', 'lock', 'grad_checkpointing')}
    for dim_key in ('output_dim', 'embed_dim'):
        value = arguments.get(dim_key)
        if value is not None and value != embed_dim:
            raise ConfigError(
                f'{where}.{dim_key}={value} differs from model.embed_dim={embed_dim}; every tower must output '
                f'model.embed_dim features, so remove {where}.{dim_key} or make the two equal'
            )
    filled = [key for key in ('output_dim', 'embed_dim')
              if key in inspect.signature(constructor).parameters and key not in arguments][:1]
    check_keys(where, arguments, [constructor], filled_keys=filled)

    if tower.get('lock') is not None:
        lock = getattr(constructor, 'lock', None)
        if not isinstance(tower['lock'], dict):
            raise ConfigError(f'{where}.lock must be a mapping of the arguments of lock(), got {tower["lock"]!r}')
        if lock is not None:
            check_keys(f'{where}.lock', tower['lock'], [lock])
    if not isinstance(tower.get('grad_checkpointing', False), bool):
        raise ConfigError(f'{where}.grad_checkpointing={tower["grad_checkpointing"]!r} must be true or false')


def _check_loss(loss: dict[str, Any], kind: str, tower_counts: dict[str, int], builders: Any) -> None:
    loss_class = builders.LOSS_CLASSES[kind]
    derived = {
        'multi_vision': {'num_multi_encoders': ('vision', 'model.vision_encoders'), 'text_to_multi_vision': True},
        'multi_text': {'num_multi_encoders': ('text', 'model.text_encoders'), 'text_to_multi_vision': False},
        'multi_encoder': {'num_vision_encoders': ('vision', 'model.vision_encoders'),
                          'num_text_encoders': ('text', 'model.text_encoders')},
    }[kind]
    for key, setting in derived.items():
        if key not in loss:
            continue
        if isinstance(setting, tuple):
            side, tower_key = setting
            if loss[key] != tower_counts[side]:
                raise ConfigError(
                    f'loss.{key}={loss[key]} does not match {tower_key}, which has {tower_counts[side]} towers; '
                    f'remove loss.{key} (it is taken from the model) or make the two agree'
                )
        elif loss[key] != setting:
            raise ConfigError(
                f'loss.{key}={loss[key]} contradicts model.name={kind!r}; remove loss.{key}, the model kind sets it'
            )

    arguments = {key: value for key, value in loss.items() if key not in derived}
    check_keys('loss', arguments, [loss_class], filled_keys=['rank', 'world_size', *derived])
    aggregation = loss.get('aggregation', 'mean')
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f'loss.aggregation={aggregation!r} is invalid; choose one of {AGGREGATIONS}')
    if loss.get('learnable_weights') and aggregation != 'weighted':
        raise ConfigError(
            f"loss.learnable_weights=true needs loss.aggregation='weighted', but loss.aggregation={aggregation!r}; "
            f'set one of the two differently'
        )


def _check_section_keys(section: str, values: dict[str, Any] | None, valid_keys: Iterable[str]) -> None:
    valid_keys = sorted(valid_keys)
    for key in values or {}:
        if key not in valid_keys:
            raise ConfigError(f'unknown key {section}.{key}{closest_key_hint(key, valid_keys)} Valid keys: {valid_keys}')


def _check_loader(section: str, loader: dict[str, Any], builders: Any) -> None:
    if loader.get('local') is None and loader.get('remote') is None:
        raise ConfigError(f'{section}.local is missing; set the shard folder (or {section}.remote and a cache in '
                          f'{section}.local)')
    for key in loader:
        if key.replace('_', '') == 'batchsize':
            raise ConfigError(
                f'{section}.{key} is not a loader setting: set the top-level global_train_batch_size (split over '
                f'the ranks) or device_eval_batch_size'
            )
    check_keys(section, loader, builders.LOADER_FUNCTIONS, extra_keys=['max_bad_samples'],
               filled_keys=['batch_size', 'image_transforms', 'tokenizers'], defaulted_keys=['shuffle', 'drop_last'],
               forwards_kwargs=False)
    try:
        check_max_bad_samples(loader.get('max_bad_samples'))
    except (TypeError, ValueError) as error:
        raise ConfigError(f'{section}.{error}') from error


def _type_hints(function: Callable) -> dict[str, Any]:
    target = function.__init__ if inspect.isclass(function) else function
    try:
        return typing.get_type_hints(target)
    # Annotations that name types unavailable at run time are skipped.
    except (NameError, TypeError, AttributeError):
        return {}


def _matches_type(value: Any, hint: Any) -> bool:
    """Return whether a YAML value fits a type annotation; annotations that are not plain types pass."""
    if hint is Any or hint is None:
        return True
    if isinstance(hint, tuple):
        return any(_matches_type(value, option) for option in hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list, typing.Sequence, Iterable) or hint in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if inspect.isclass(hint):
        # YAML gives paths and enum members as str.
        if issubclass(hint, (os.PathLike, pathlib.PurePath, enum.Enum)):
            return isinstance(value, str)
        return isinstance(value, hint)
    # Type variables, literals and other annotations are not checked here.
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, tuple):
        return ' or '.join(_type_name(option) for option in hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return ' or '.join(_type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return str(hint).replace('typing.', '')
    return 'null' if hint is type(None) else getattr(hint, '__name__', str(hint))
