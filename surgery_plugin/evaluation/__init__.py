"""Judges and harnesses for judging an edit (ours or a baseline's) on the same data and judges."""

from .judges import JUDGES, load_judge, load_judges
from .protocols import PROTOCOLS
from .runner import evaluate, parse_suites, write_run
from .suites import EvalSettings

__all__ = ["JUDGES", "PROTOCOLS", "EvalSettings", "evaluate", "load_judge", "load_judges", "parse_suites", "write_run"]
