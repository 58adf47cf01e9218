"""``surgery compare``: Surgery against EasyEdit's DINM, ROME, FT-L, FT-M and a safety prompt on one model.

| module | job |
|---|---|
| ``config`` | what a run depends on (:class:`CompareConfig`), the methods and suites, their checks |
| ``methods`` | the run: one row per method, each edited from the unedited model, saved, reloaded, judged |
| ``meter`` | an edit's wall time and peak memory |
| ``report`` | the table, ``compare.md``, ``tradeoff.png``; ``compare.json`` |
| ``reuse`` | ``--reuse``: the rows other runs of the same comparison finished (a split comparison merges) |
"""

from __future__ import annotations

import sys

from .config import CompareConfig, parse_compare_suites, parse_methods, parse_sample_suites, parse_sets
from .methods import Comparison
from .report import failed_methods, result_table


def run_compare(config: CompareConfig) -> dict:
    """Run a comparison (see :mod:`.methods`); returns what ``compare.json`` holds."""
    return Comparison(config).run()


def run_compare_and_report(config: CompareConfig) -> int:
    """Run, print the table; exit code 1 when a method failed."""
    result = run_compare(config)
    print(f"\n{result_table(result)}\n\nwritten to {config.out}/ (compare.json, compare.md, tradeoff.png, edits/)")
    missing = result["settings"].get("not_measured")
    if missing:
        print(f"surgery: partial (--reuse-only): {', '.join(missing)} not measured yet", file=sys.stderr)
    failed = failed_methods(result)
    if failed:
        print(f"surgery: {len(failed)} method(s) failed: {', '.join(failed)} (see compare.md)", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "CompareConfig",
    "parse_compare_suites",
    "parse_methods",
    "parse_sample_suites",
    "parse_sets",
    "run_compare",
    "run_compare_and_report",
]
