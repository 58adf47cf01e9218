"""ROME's second-moment statistics from local text, for machines that cannot download Wikipedia.

ROME's update of a down projection is ``C^-1 k`` scaled, with ``C = E[k k^T]`` the uncentred second moment
of the projection's inputs over general text; EasyEdit computes ``C`` from Wikipedia on the hub
(``layer_stats``) and caches it as an ``.npz`` next to ``stats_dir``. A YAML with ``mom2_dataset: local_text``
gets ``C`` from the first ``mom2_n_samples`` Alpaca instructions of the refusal-direction splits
(``instructions/harmless_train.json``: general requests, no report reads them), computed here with EasyEdit's
own ``SecondMoment`` and written where EasyEdit's loader looks, under the cache root; EasyEdit then reads it
as if it had made it. The dataset name becomes ``local_text-<sha256 of the texts>`` so that other texts never
reuse a file, and how many tokens went in is recorded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy
import torch
from torch import nn

from ...core.batching import length_sorted_batches, pad
from ...data.loaders import load_instructions
from ...errors import SurgeryError
from ...io.cache import cache_root
from ...io.files import atomic_write

logger = logging.getLogger(__name__)

LOCAL_TEXT = "local_text"  # the mom2_dataset name that asks for these statistics
SOURCE = "harmless_train"  # instructions/<SOURCE>.json


class _Stop(Exception):
    """Raised by the capture hook: nothing after the rewrite module is needed."""


def stats_file(model: nn.Module, stats_dir: Path, dataset: str, layer_name: str, precision: str, n: int) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for its cache (its naming, for ``batch_tokens`` unset)."""
    model_name = model.config._name_or_path.rsplit("/")[-1]
    return stats_dir / model_name / f"{dataset}_stats" / f"{layer_name}_{precision}_mom2_{n}.npz"


@torch.no_grad()
def second_moment(
    model: nn.Module, tokenizer, module_name: str, texts: list[str], batch_size: int = 16, progress: bool = True
) -> tuple[torch.Tensor, int]:
    """``(sum of k k^T, tokens)`` over every real token of ``texts``, ``k`` the input of ``module_name``;
    float64. The forward stops at that module."""
    module = model.get_submodule(module_name)
    encoded = [tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    total: torch.Tensor | None = None
    tokens = 0
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for batch in length_sorted_batches(
            [len(ids) for ids in encoded], batch_size, desc=f"rome stats {module_name}", progress=progress
        ):
            ids, mask = pad([encoded[i] for i in batch], 0, "right")  # right padding: causal positions never see it
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            except _Stop:
                pass
            keys = captured[0][mask.to(device).bool()].double().cpu()
            total = keys.T @ keys if total is None else total + keys.T @ keys
            tokens += keys.shape[0]
    finally:
        handle.remove()
    if total is None or tokens == 0:
        raise SurgeryError("no tokens to compute ROME's statistics from")
    return total, tokens


def prepare_local_stats(model: nn.Module, tokenizer, hparams, data_dir=None, progress: bool = True) -> dict | None:
    """For ``mom2_adjustment: true`` with ``mom2_dataset: local_text``: the statistics of every edited layer,
    computed once and cached where EasyEdit reads them; ``hparams.stats_dir`` and ``mom2_dataset`` point there.
    Returns how they were made (None for any other YAML: EasyEdit's own path)."""
    if not getattr(hparams, "mom2_adjustment", False) or not str(hparams.mom2_dataset).startswith(LOCAL_TEXT):
        return None
    from easyeditor.models.rome import compute_u
    from easyeditor.util.runningstats import CombinedStat, SecondMoment, box_numpy_null

    n = int(hparams.mom2_n_samples)
    available = load_instructions(data_dir, SOURCE)
    if n < 1 or n > len(available):
        raise SurgeryError(f"mom2_n_samples {n}: {LOCAL_TEXT} has {len(available)} texts ({SOURCE})")
    texts = available[:n]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    dataset = f"{LOCAL_TEXT}-{digest}"
    stats_dir = cache_root() / "easyedit_stats"
    record = {"source": f"instructions/{SOURCE}.json[0:{n}]", "texts": n, "dataset": dataset, "layers": {}}
    for layer in hparams.layers:
        layer_name = hparams.rewrite_module_tmp.format(layer)
        path = stats_file(model, stats_dir, dataset, layer_name, hparams.mom2_dtype, n)
        if not path.is_file():
            logger.info("ROME: second moments of %s over %d local texts (once; cached at %s)", layer_name, n, path)
            total, tokens = second_moment(model, tokenizer, layer_name, texts, progress=progress)
            stat = CombinedStat(mom2=SecondMoment())
            stat.mom2.count, stat.mom2.mom2 = tokens, total.to(getattr(torch, hparams.mom2_dtype))
            # what EasyEdit's save_cached_state writes (its state dict and the sample size it checks on load)
            buffer = io.BytesIO()
            numpy.savez(buffer, **box_numpy_null({**stat.state_dict(), "sample_size": n}))
            atomic_write(path, buffer.getvalue())
        count = int(numpy.load(path)["mom2.count"])
        record["layers"][layer_name] = {"file": str(path), "tokens": count}
        # EasyEdit keeps inverses per (model, layer) for the process: another dataset must not reuse one
        compute_u.inv_mom2_cache.pop((model.config._name_or_path.replace("/", "_"), layer_name), None)
    hparams.stats_dir = str(stats_dir)
    hparams.mom2_dataset = dataset
    return record
