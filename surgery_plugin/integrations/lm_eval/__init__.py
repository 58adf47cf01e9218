"""lm-eval tasks that ship with the package: ``lm_eval --include_path $(surgery tasks-path) --tasks surgery_rtp``.

Behavior is declared in the YAML files; ``hooks.py`` holds the small functions they call
(local data loading, judging). Data comes from the local data folder (``$SURGERY_DATA_DIR`` or
``../shared/data``) so no hub access is needed when it exists.
"""

from pathlib import Path


def tasks_path() -> Path:
    return Path(__file__).resolve().parent
