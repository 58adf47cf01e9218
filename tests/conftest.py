"""Fixtures; the helpers they use live in ``helpers.py``."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import DATA_DIR, CharTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder {DATA_DIR} not present")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (dequantised once into the cache)."""
    from surgery_plugin.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, saved as an ordinary HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
