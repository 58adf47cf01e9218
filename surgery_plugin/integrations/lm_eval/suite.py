"""Any other ``--suite`` name lm-eval knows (mmlu, gsm8k, surgery_rtp, ...) runs through ``lm_eval.simple_evaluate``
on the already-loaded model (adapter included), with the package's own tasks on the include path."""

from __future__ import annotations

import logging
from functools import lru_cache

from torch import nn

from ...errors import SurgeryError, first_line

logger = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def task_manager(include_defaults: bool):
    """lm-eval's task index with the package's tasks; without lm-eval's own (``include_defaults=False``)
    it is built in well under a second instead of indexing thousands of YAML files."""
    from lm_eval.tasks import TaskManager

    from . import tasks_path

    return TaskManager(include_path=str(tasks_path()), include_defaults=include_defaults)


def manager_for(names) -> object:
    own = set(task_manager(False).all_tasks)
    return task_manager(not set(names) <= own)


def lm_eval_task_names(names=()) -> frozenset[str]:
    """Task and group names lm-eval can load (``surgery_*`` + lm-eval's own unless ``names`` are all ours)."""
    if not lm_eval_available():
        return frozenset()
    return frozenset(manager_for(names).all_tasks)


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval_task(task: str, model: nn.Module, tokenizer, settings) -> tuple[dict, list[dict]]:
    """``simple_evaluate`` on one task; the summary holds lm-eval's metrics for it (and its subtasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    try:
        out = simple_evaluate(
            model=lm,
            tasks=[task],
            limit=settings.limit,
            task_manager=manager_for([task]),
            log_samples=True,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    except SurgeryError:
        raise
    except Exception as err:  # data not reachable offline, gated sets, missing extras: one line, not a traceback
        raise SurgeryError(
            f"lm-eval could not run task '{task}' ({first_line(err)}); it needs its data set "
            f"(hub access or a local HF datasets cache) and any extras the task lists"
        ) from err
    if out is None:
        raise SurgeryError(f"lm-eval returned no results for task '{task}'")
    results = {
        name: {k: v for k, v in metrics.items() if k != "alias"} for name, metrics in out.get("results", {}).items()
    }
    summary = {
        "lm_eval_task": task,
        "metrics": results.get(task, {}),
        "subtasks": {k: v for k, v in results.items() if k != task},
        "n": {k: v.get("effective", v.get("original")) for k, v in out.get("n-samples", {}).items()},
        "limit": settings.limit,
        "lm_eval_version": _version(),
    }
    rows = []
    for name, samples in (out.get("samples") or {}).items():
        for s in samples:
            args = s.get("arguments") or []
            first_arg = args[0][0] if args and isinstance(args[0], (list, tuple)) and args[0] else None
            response = (s.get("filtered_resps") or [None])[0]
            metric_values = {m: s[m] for m in s.get("metrics", []) if m in s}
            rows.append(
                {
                    "suite": task,
                    "task": name,
                    "doc_id": s.get("doc_id"),
                    "prompt": first_arg if isinstance(first_arg, str) else None,
                    "completion": response if isinstance(response, str) else None,
                    "target": s.get("target") if isinstance(s.get("target"), (str, int, float)) else None,
                    "metrics": {k: v for k, v in metric_values.items() if isinstance(v, (int, float, str, bool))},
                }
            )
    return summary, rows


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
