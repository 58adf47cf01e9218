"""``--reuse RUN``: rows another run of the same comparison finished, so a comparison split over processes merges.

A full comparison is a dozen rows of an hour's CPU each; split by ``--methods`` over processes (or machines), each
part is its own ``surgery compare``. The merged command (every method, ``--reuse`` naming the parts) takes each row
a part finished instead of measuring it: from the part's store of finished rows (``RUN.arms/``: a part still running
or stopped) or from its output (``RUN/compare.json``: a part that finished, whose rows carry their fingerprints).
A row is taken only when its fingerprint is this run's (:mod:`surgery_plugin.evaluation.arms`: the model, data,
suites, limits, seeds, judges, the package version and, for EasyEdit's baselines, their hyperparameters) and the
libraries it was measured with are these; it is copied into this run's store, and the parts are only read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ...core.provenance import package_versions
from ...errors import SurgeryError
from ...evaluation.arms import STORE_SUFFIX, changed_versions, is_store, read_samples, store_folder
from ...io.files import read_manifest, verify_files

logger = logging.getLogger(__name__)

# what compare.json adds to a row's result (its report), dropped to get back what the row measured
_REPORT_KEYS = ("label", "method", "description", "error", "vs_surgery", "fingerprint")


def check_sources(sources: tuple[str | os.PathLike, ...], target: Path) -> list[Path]:
    """``--reuse``'s runs as absolute ``--out`` paths; a one-line error for one that holds no comparison or is this
    run's own output. A run's store (``RUN.arms``) may be named instead of the run."""
    runs = []
    for source in sources:
        run = Path(os.path.abspath(os.path.expanduser(os.fspath(source))))
        if run.name.endswith(STORE_SUFFIX) and is_store(run):
            run = run.with_name(run.name.removesuffix(STORE_SUFFIX))
        if run == target:
            raise SurgeryError(f"--reuse {source} is this run's own --out (its finished rows are reused anyway)")
        if not (run / "compare.json").is_file() and not is_store(store_folder(run)):
            raise SurgeryError(
                f"--reuse {source}: no comparison there (neither {run / 'compare.json'} nor a store of finished rows "
                f"at {store_folder(run)})"
            )
        runs.append(run)
    return runs


def finished_output_row(run: Path, name: str, key: str) -> tuple[dict, list[dict], dict | None] | None:
    """``(result, samples, control band)`` of row ``name`` in the finished comparison ``run`` when it measured that
    row with fingerprint ``key`` under these libraries; None when it did not (the reason is logged)."""
    if not (run / "compare.json").is_file():
        return None
    try:
        verify_files(run, read_manifest(run, "comparison"))
        compare = json.loads((run / "compare.json").read_text(encoding="utf-8"))
    except (SurgeryError, OSError, ValueError) as err:
        logger.warning("--reuse %s: its compare.json is unreadable (%s); none of its rows is taken", run, err)
        return None
    row = compare.get("methods", {}).get(name)
    if row is None or row.get("status") != "ok":
        return None
    why = None
    if "fingerprint" not in row:
        why = "its rows carry no fingerprint (written by an older surgery_plugin)"
    elif row["fingerprint"] != key:
        why = "it was measured with other settings"
    else:
        now = package_versions()
        why = changed_versions({k: v for k, v in compare["settings"].get("versions", {}).items() if k in now})
        why = why and f"it was measured with {why}"
    if why:
        logger.info("row %s in %s not taken: %s", name, run, why)
        return None
    try:
        samples = read_samples(run / "runs" / name / "samples.jsonl")
    except (OSError, ValueError) as err:
        logger.warning("row %s in %s not taken: its generations are unreadable (%s)", name, run, err)
        return None
    result = {k: v for k, v in row.items() if k not in _REPORT_KEYS}
    paired = result.get("paired")
    band = paired.get("controls") if isinstance(paired, dict) and result.get("controls") else None
    if isinstance(paired, dict):  # the band the merged run holds goes beside every row at its end
        result["paired"] = {k: v for k, v in paired.items() if k != "controls"}
    return result, samples, band
