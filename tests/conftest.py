"""Fixtures; the helpers they use live in ``helpers.py``."""

from __future__ import annotations

import os

import pytest
from helpers import DATA_DIR, CharTokenizer, save_tiny_model, tiny_hf_tokenizer

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


@pytest.fixture(scope="module")
def smollm2():
    """The real embedded model (dequantised once into the cache), loaded once per test module. Tests that
    edit it in place restore it (apply_edit / revert_edit) or load their own."""
    from surgery_plugin.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny_hf_tokenizer()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a tiny BPE tokenizer (chat template included), saved as an ordinary HF folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A surgery adapter for the tiny model folder: large enough a step to change its continuations."""
    import torch

    from surgery_plugin import SurgeryHyperParams, execute_surgery, export_adapter
    from surgery_plugin.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(3)
    edit = execute_surgery(model, torch.randn(32), SurgeryHyperParams(top_k=8, alpha=2.0, normalize=True))
    return export_adapter(edit, model, tmp_path_factory.mktemp("adapter") / "adapter", str(tiny_model_dir))
