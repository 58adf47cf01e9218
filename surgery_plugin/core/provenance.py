"""How an artefact was made: package versions, digests of files, texts and weights.

Every probe, adapter, run and tuning study records these, so a result can be traced to the
exact model weights, data and code that produced it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from collections.abc import Sequence
from importlib import metadata as importlib_metadata

import torch
from torch import nn

from . import architectures

_PACKAGES = ("surgery_plugin", "torch", "transformers", "peft", "safetensors")
_FINGERPRINT_SAMPLES = 64
_FINGERPRINT_RTOL = 1e-2  # loose enough for the same weights in bf16/fp16, far below a fine-tune's drift


def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in (*_PACKAGES, *extra):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike, length: int | None = None) -> str:
    """sha256 of a file's bytes (hex), cut to ``length`` characters when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def labeled_texts_sha256(texts: Sequence[str], labels: Sequence[int], length: int = 16) -> str:
    """sha256 of ``label<TAB>text`` lines: names a labelled data set in metadata."""
    lines = "\n".join(f"{label}\t{text}" for text, label in zip(texts, labels, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()[:length]


def model_fingerprint(model: nn.Module) -> str | None:
    """A digest of every parameter's name, shape, dtype, device and values; None when values are not visible.

    CPU tensors are hashed byte for byte. Elsewhere (GPU) the values enter as float64 sum and
    sum of squares computed on the device, which any surgery changes, instead of copying
    every weight to the host.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded: the weights are not here to fingerprint
            return None
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{param.device}".encode())
        data = param.detach()
        if data.device.type == "cpu":
            digest.update(memoryview(data.contiguous().view(torch.uint8).numpy()))
        else:
            moments = torch.stack([data.sum(dtype=torch.float64), data.double().square().sum()])
            digest.update(moments.cpu().numpy().tobytes())
    return digest.hexdigest()


def fingerprint_positions(num_layers: int, rows: int, hidden: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed ``(rows, cols)`` of every layer's gate rows that :func:`gate_fingerprint` samples."""
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, rows, (_FINGERPRINT_SAMPLES,), generator=generator),
            torch.randint(0, hidden, (_FINGERPRINT_SAMPLES,), generator=generator),
        )
        for _ in range(num_layers)
    ]


def gate_fingerprint(model: nn.Module | architectures.GateRows) -> list[list[float]]:
    """A few fixed entries of every layer's gate rows: the same for the same base in any dtype,
    whether read from a loaded model or from its checkpoint shards."""
    gates = architectures.gates_of(model)
    positions = fingerprint_positions(gates.num_layers, gates.rows_per_layer, gates.hidden_size)
    with torch.no_grad():
        return [[float(x) for x in gates.entries(layer, r, c)] for layer, (r, c) in enumerate(positions)]


def fingerprint_mismatch(expected: list[list[float]], actual: list[list[float]]) -> str | None:
    """None when two gate fingerprints match, else a short description of the first difference."""
    if len(expected) != len(actual):
        return f"{len(expected)} layers vs {len(actual)}"
    for layer, (a, b) in enumerate(zip(expected, actual, strict=True)):
        ta, tb = torch.tensor(a), torch.tensor(b)
        if ta.shape != tb.shape or not torch.allclose(tb, ta, rtol=_FINGERPRINT_RTOL, atol=1e-6):
            return f"gate weights of layer {layer} differ"
    return None
