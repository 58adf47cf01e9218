"""Judging an edit (ours or a baseline's) on the same prompts, seeds and judges: protocols, suites, judges,
generation, statistics and reports."""
