"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
STAMPS_ENV_VAR = 'COMPOSER_CLIP_STAMPS_DIR'


@pytest.fixture(scope='session')
def tuxpaint_stamps() -> Path:
    """Return the folder of Tux Paint's stamps (animals/, food/, ...), real PNGs with English captions.

    Looked up in order: the COMPOSER_CLIP_STAMPS_DIR environment variable, the
    installed package at /usr/share/tuxpaint/stamps, and an extraction of the Debian
    package under .cache/demo in the repository (downloaded by apt-get once, then
    reused).
    """
    from composer_clip.data.demo import DEFAULT_STAMPS_DIR, extract_stamps_package

    configured = os.environ.get(STAMPS_ENV_VAR)
    if configured:
        stamps_dir = Path(configured)
        if not stamps_dir.is_dir():
            raise FileNotFoundError(f'{STAMPS_ENV_VAR}={configured} is not a folder; unset it or point it at the stamps')
        return stamps_dir

    if DEFAULT_STAMPS_DIR.is_dir():
        return DEFAULT_STAMPS_DIR

    return extract_stamps_package(REPO_ROOT / '.cache' / 'demo')


def write_tiny_roberta(folder: Path) -> Path:
    """Write a tiny RoBERTa with its own byte-level BPE tokenizer, trained on a few captions, to `folder`.

    Its tokenizer differs from BERT's WordPiece in vocabulary and pad id (1 instead of 0),
    which is what multi-text tests need.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    captions = ['a red bicycle', 'two cats on a sofa', 'the quick brown fox jumps over the lazy dog'] * 10
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=400, min_frequency=1,
                            special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(
        vocab_file=str(folder / 'vocab.json'), merges_file=str(folder / 'merges.txt'), model_max_length=64
    )
    tokenizer.save_pretrained(folder)

    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
    )
    RobertaModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='session')
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A local folder holding a tiny RoBERTa model and its byte-level BPE tokenizer."""
    return write_tiny_roberta(tmp_path_factory.mktemp('tiny_roberta'))


@pytest.fixture()
def s3_server(monkeypatch):
    """Start an S3-protocol server (moto) on 127.0.0.1 and point boto3, Composer and Streaming at it.

    Returns the endpoint URL. The server and its buckets live for one test.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f'http://{host}:{port}'
    monkeypatch.setenv('S3_ENDPOINT_URL', endpoint)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'testing')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'testing')
    monkeypatch.setenv('AWS_DEFAULT_REGION', 'us-east-1')
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture()
def destroy_process_group():
    """Destroy the default process group that an in-process Trainer run leaves behind.

    Composer initializes torch.distributed even for one process, and later tests expect
    it uninitialized.
    """
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
