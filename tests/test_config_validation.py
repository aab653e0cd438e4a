"""Config validation: typos, wrong types, missing keys and cross-field errors, before anything is built."""

from pathlib import Path

import pytest

from composer_clip import builders
from composer_clip.builders import load_config
from composer_clip.config_validation import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = ['quickstart.yaml', 'mvclip.yaml', 'mtclip.yaml', 'mnclip.yaml']


@pytest.fixture(autouse=True)
def no_model_built(monkeypatch):
    """Fail a test if validation lets a config reach the point where towers are built."""

    def build_encoder(*args, **kwargs):
        raise AssertionError('an encoder was built during validation')

    monkeypatch.setattr(builders, 'build_encoder', build_encoder)


def load(recipe: str, *overrides: str):
    return load_config(str(REPO_ROOT / 'yamls' / recipe), list(overrides))


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipes_validate(recipe):
    assert load(recipe).model.embed_dim > 0


# Each case: recipe, overrides, and a pattern the error message must match.
TYPO_CASES = [
    ('quickstart.yaml', ['model.vision_encoders[0].imge_size=224'],
     r"unknown key model\.vision_encoders\[0\]\.imge_size; did you mean 'image_size'\? Valid keys: \['image_size', "),
    ('quickstart.yaml', ['model.text_encoder.lock.unlocked_layer=1'],
     r"unknown key model\.text_encoder\.lock\.unlocked_layer; did you mean 'unlocked_layers'\?"),
    ('quickstart.yaml', ['model.text_encoder.name=transformer_text'],
     r"model\.text_encoder\.name='transformer_text' is not a registered encoder; did you mean 'transformers_text'\?"),
    ('quickstart.yaml', ['model.visionencoders=[]'],
     r"unknown key model\.visionencoders for model\.name='multi_vision'; did you mean 'vision_encoders'\?"),
    ('mvclip.yaml', ['loss.agregation=mean'],
     r"unknown key loss\.agregation; did you mean 'aggregation'\? Valid keys: \['aggregation', 'learnable_weights'\]"),
    ('mvclip.yaml', ['train_loader.shufle=true'], r"unknown key train_loader\.shufle; did you mean 'shuffle'\?"),
    ('mtclip.yaml', ['scheduler.t_warmpu=10ba'], r"unknown key scheduler\.t_warmpu; did you mean 't_warmup'\?"),
    ('mnclip.yaml', ['optimizer.weight_decy=0.1'], r"unknown key optimizer\.weight_decy; did you mean 'weight_decay'\?"),
    ('quickstart.yaml', ['zero_shot.template=simple'], r"unknown key zero_shot\.template; did you mean 'templates'\?"),
    ('quickstart.yaml', ['loggers={tensorbord: {}}'], r"unknown key loggers\.tensorbord; did you mean 'tensorboard'\?"),
    ('quickstart.yaml', ['optimizer.learning_rate=1e-3'], r"unknown key optimizer\.learning_rate; did you mean 'lr'\?"),
    ('quickstart.yaml', ['model.text_encoder.name=byte_text'],
     r"'byte_text' is not a registered encoder.*For your own encoder, list the file that registers it under code_paths"),
    ('quickstart.yaml', ['max_durration=1ep'],
     r"unknown top-level keys \['max_durration'\].*closest valid keys: 'max_durration' -> 'max_duration'"),
]


@pytest.mark.parametrize('recipe, overrides, message', TYPO_CASES, ids=[case[1][0] for case in TYPO_CASES])
def test_unknown_key_names_closest(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(recipe, *overrides)


TYPE_CASES = [
    (['model.vision_encoders[1].image_size=big'],
     r"model\.vision_encoders\[1\]\.image_size='big' has type str, expected int or Tuple\[int, int\]"),
    (['optimizer.lr=fast'], r"optimizer\.lr='fast' has type str, expected float or Tensor"),
    (['optimizer.betas=0.9'], r'optimizer\.betas=0\.9 has type float, expected tuple'),
    (['train_loader.num_workers=two'], r"train_loader\.num_workers='two' has type str, expected int"),
    (['global_train_batch_size=many'], r"global_train_batch_size='many' has type str, expected int"),
    (['global_train_batch_size=0'], r'global_train_batch_size=0 is invalid; it must be at least 1'),
    (['model.vision_encoders[0].grad_checkpointing=yes please'],
     r"model\.vision_encoders\[0\]\.grad_checkpointing='yes please' must be true or false"),
    (['loss.learnable_weights=1'], r'loss\.learnable_weights=1 has type int, expected bool'),
    (['model.embed_dim=-4'], r'model\.embed_dim=-4 is invalid; it must be a positive int'),
    (['precision=bf16'], r"precision='bf16' is invalid; did you mean 'amp_bf16'\? Valid values: \['fp32', "),
    (['eval_interval=2x'], r"eval_interval='2x' is not a time: write a number and a unit, such as 10ep"),
    (['scheduler.t_max=soon'], r"scheduler\.t_max='soon' is not a time"),
    (['loss.aggregation=avg'], r"loss\.aggregation='avg' is invalid; choose one of \('mean', "),
    (['train_loader.max_bad_samples=1.5'], r'train_loader\.max_bad_samples=1\.5 is an invalid fraction'),
    (['train_loader.batch_size=8'], r'train_loader\.batch_size is not a loader setting: set the top-level '
                                    r'global_train_batch_size'),
]


@pytest.mark.parametrize('overrides, message', TYPE_CASES, ids=[case[0][0] for case in TYPE_CASES])
def test_wrong_type_names_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load('quickstart.yaml', *overrides)


MISSING_CASES = [
    (['seed=null'], r'seed is missing in .*quickstart\.yaml; it is required'),
    (['model.embed_dim=null'], r'model\.embed_dim is missing; it is required'),
    (['model.vision_encoders[1].model_name=null'], r'model\.vision_encoders\[1\]\.model_name is missing'),
    (['model.text_encoder={pooler_type: mean}'],
     r"model\.text_encoder\.name is missing; set it to one of \['hf_text', "),
    (['train_loader.local=null'], r'train_loader\.local is missing; set the shard folder'),
    (['model.name=multi_text'],
     r"unknown key model\.text_encoder for model\.name='multi_text'; did you mean 'text_encoders'\?"),
    (['model={name: multi_text, embed_dim: 8, text_encoders: [{name: hf_text}]}'],
     r"model\.vision_encoder is missing; model\.name='multi_text' requires it"),
]


@pytest.mark.parametrize('overrides, message', MISSING_CASES, ids=[case[0][0] for case in MISSING_CASES])
def test_missing_key_names_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load('quickstart.yaml', *overrides)


CROSS_FIELD_CASES = [
    ('quickstart.yaml', ['loss.num_multi_encoders=3'],
     r'loss\.num_multi_encoders=3 does not match model\.vision_encoders, which has 2 towers'),
    ('mtclip.yaml', ['loss.num_multi_encoders=1'],
     r'loss\.num_multi_encoders=1 does not match model\.text_encoders, which has 2 towers'),
    ('mnclip.yaml', ['loss.num_text_encoders=3'],
     r'loss\.num_text_encoders=3 does not match model\.text_encoders, which has 2 towers'),
    ('quickstart.yaml', ['loss.text_to_multi_vision=false'],
     r"loss\.text_to_multi_vision=False contradicts model\.name='multi_vision'"),
    ('quickstart.yaml', ['loss.aggregation=mean'],
     r"loss\.learnable_weights=true needs loss\.aggregation='weighted', but loss\.aggregation='mean'"),
    ('quickstart.yaml', ['model.vision_encoders[1].embed_dim=128'],
     r'model\.vision_encoders\[1\]\.embed_dim=128 differs from model\.embed_dim=256'),
    ('mvclip.yaml', ['model.text_encoder.output_dim=64'],
     r'model\.text_encoder\.output_dim=64 differs from model\.embed_dim=512'),
]


@pytest.mark.parametrize('recipe, overrides, message', CROSS_FIELD_CASES,
                         ids=[case[1][0] for case in CROSS_FIELD_CASES])
def test_cross_field_error_names_both(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(recipe, *overrides)


def test_override_with_list_index():
    config = load('quickstart.yaml', 'model.vision_encoders[1].image_size=96')

    assert config.model.vision_encoders[1].image_size == 96
    assert config.model.vision_encoders[0].image_size == 224


def test_code_paths_missing_file_named(tmp_path):
    missing = tmp_path / 'my_encoders.py'

    with pytest.raises(FileNotFoundError, match=f'code_paths entry {missing} was not found'):
        load('quickstart.yaml', f'code_paths=[{missing}]')
