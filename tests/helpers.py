"""Helpers shared by the tests: tiny random models of every family, toy tokenizers and classifiers,
and the ``surgery`` command run as a user runs it. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data").resolve()
EASYEDIT_ARCHIVE = (REPO / ".." / "shared" / "vendor" / "EasyEdit-14cea8245f06.tar.gz").resolve()

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)
_SMALL = dict(vocab_size=96, max_position_embeddings=64, **_IDS)


def tiny_config(model_type: str):
    import transformers as tf

    llama_like = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **_SMALL,
    )
    configs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **llama_like),
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, sliding_window=16, **llama_like),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, sliding_window=16, **llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_inner=48, vocab_size=96, n_positions=64, **_IDS
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, **_SMALL
        ),
        "gptj": lambda: tf.GPTJConfig(
            n_embd=32, n_layer=3, n_head=4, n_inner=48, rotary_dim=4, vocab_size=96, n_positions=64, **_IDS
        ),
        "opt": lambda: tf.OPTConfig(
            hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32, **_SMALL
        ),
        "falcon": lambda: tf.FalconConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=96, **_IDS
        ),
    }
    return configs[model_type]()


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "falcon",
]


def make_tiny(model_type: str, dtype=torch.float32, seed: int = 0, vocab_size: int | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.name_or_path = f"tiny-{model_type}"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # random init of this size gives near-zero gates; widen so edits are visible
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


class CharTokenizer:
    """A minimal tokenizer for tiny models: one id per character (mod vocab), ``__call__`` like HF's
    (``truncation_side`` included)."""

    pad_token_id = 0
    eos_token_id = 1
    padding_side = "right"
    truncation_side = "right"

    def __init__(self, vocab_size: int = 96):
        self.vocab_size = vocab_size

    def __call__(self, text, truncation=False, max_length=None, **_):
        ids = [2 + (ord(c) % (self.vocab_size - 2)) for c in text]
        if truncation and max_length and len(ids) > max_length:
            ids = ids[-max_length:] if self.truncation_side == "left" else ids[:max_length]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids if not (skip_special_tokens and int(i) < 2))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_hf_tokenizer(chat: bool = True):
    """A real ``PreTrainedTokenizerFast`` (byte-level BPE, 300 tokens, trained in milliseconds on a few
    sentences; pad 0, eos 1), with a chat template when ``chat``: what a tiny model folder needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TEXTS * 3 + [" ".join(WORDS)] * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(folder: Path, model_type: str = "llama", chat: bool = True, seed: int = 0) -> Path:
    """A tiny random model of ``model_type`` with :func:`tiny_hf_tokenizer`, saved as an ordinary HF folder."""
    tok = tiny_hf_tokenizer(chat)
    model = make_tiny(model_type, seed=seed, vocab_size=len(tok))
    model.config.name_or_path = str(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


WORDS = "you are a stupid idiot i love sunny days the weather is nice hate all people from there go home".split()
TEXTS = ["you are a stupid idiot", "i love sunny days", "the weather is nice", "hate all people from there", ""]


def bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_bert(num_labels: int, seed: int = 0, **config):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        **config,
    )
    return BertForSequenceClassification(cfg).eval()


@dataclass
class Ran:
    """What a ``surgery`` command did: exit code and its output (as ``subprocess.CompletedProcess`` has them)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> Ran:
    """The ``surgery`` command run in this process (``main([...])``), its output captured."""
    from surgery_plugin.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse's own exits (usage errors, --help)
            code = stop.code if isinstance(stop.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def surgery_subprocess(*args, cwd=None, env=None):
    """The ``surgery`` command in a fresh process, as a user runs it (for the few smoke tests that need one)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "surgery_plugin", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("surgery: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_probe(path, weight, **meta):
    from safetensors.torch import save_file

    metadata = {k: json.dumps(v) for k, v in dict(PROBE_META, hidden_size=weight.shape[1], **meta).items()}
    save_file({"weight": weight, "bias": torch.zeros(2)}, str(path), metadata=metadata)
    return path


PROBE_META = dict(model="m", layer=1, pooling="mean", n_train=4, test_accuracy=1.0, test_auc=1.0, data="d", seed=0)


def easyedit_python() -> str:
    """A python that imports ``easyeditor``: ``$SURGERY_EASYEDIT_PYTHON``, else this one (``make easyedit``,
    which ``make test`` runs, installs EasyEdit into the project venv).

    Skips only where EasyEdit could not have been installed (neither its vendored archive nor git);
    anywhere else a missing EasyEdit is a failed set-up, and the test fails saying so.
    """
    if os.environ.get("SURGERY_EASYEDIT_PYTHON"):
        return os.environ["SURGERY_EASYEDIT_PYTHON"]
    if importlib.util.find_spec("easyeditor") is not None:
        return sys.executable
    if not EASYEDIT_ARCHIVE.is_file() and shutil.which("git") is None:
        pytest.skip(f"EasyEdit cannot be installed here: neither {EASYEDIT_ARCHIVE} nor git is available")
    source = EASYEDIT_ARCHIVE if EASYEDIT_ARCHIVE.is_file() else "git"
    pytest.fail(f"EasyEdit is not installed in {sys.prefix} though {source} is available: run `make easyedit`")


def paired_eval(model_dir, adapter, data_dir, out, *options):
    """``surgery eval --paired`` of the tiny adapter with the profanity judge, in process; ``options``: the rest."""
    return run_cli(
        "eval",
        "--model",
        model_dir,
        "--adapter",
        adapter,
        "--paired",
        "--judge",
        "profanity",
        "--data-dir",
        data_dir,
        "--out",
        out,
        *options,
    )


def write_tiny_hparams(root, model_dir) -> None:
    """Every method's YAML for the tiny model folder, in EasyEdit's layout ``root/<METHOD>/tiny.yaml`` (ROME's
    layer is not in the model: that method fails in the middle of a run)."""
    common = dict(model_name=str(model_dir), device="cpu", model_parallel=False)
    modules = dict(
        rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="lm_head",
    )
    files = {
        "Surgery": dict(
            alg_name="Surgery",
            max_length=64,
            batch_size=1,
            probe_data="davidson",
            probe_layer=1,
            probe_max_per_class=20,
            probe_epochs=2,
            feature_batch_size=8,
            top_k=0.2,
            alpha=0.5,
            normalize=True,
            **common,
        ),
        "DINM": dict(
            alg_name="DINM",
            model_class="LlamaForCausalLM",
            tokenizer_class="AutoTokenizer",
            suffix_system_prompt="Please give the right response:",
            layers=[],
            num_steps=2,
            max_length=256,
            max_output_length=16,
            lr=1e-3,
            weight_decay=0,
            kl_factor=0.1,
            norm_constraint=False,
            **modules,
            **common,
        ),
        "FT": dict(
            alg_name="FT",
            layers=[1],
            num_steps=2,
            batch_size=1,
            max_length=40,
            lr=1e-3,
            weight_decay=0,
            kl_factor=0,
            norm_constraint=False,
            objective_optimization="prompt_last",
            **modules,
            **common,
        ),
        "ROME": dict(  # layer 5 of a 3-layer model: this method fails in the middle of the run
            alg_name="ROME",
            stats_dir="./stats",
            layers=[5],
            fact_token="subject_last",
            v_num_grad_steps=2,
            v_lr=0.5,
            v_loss_layer=1,
            v_weight_decay=1e-3,
            clamp_norm_factor=4,
            kl_factor=0.0625,
            mom2_adjustment=False,
            context_template_length_params=[],
            mom2_dataset="wikipedia",
            mom2_n_samples=1000,
            mom2_dtype="float32",
            **{k: v.removesuffix(".weight") for k, v in modules.items()},
            **common,
        ),
    }
    import yaml

    for method, config in files.items():
        (root / method).mkdir(parents=True)
        (root / method / "tiny.yaml").write_text(yaml.safe_dump(config))
