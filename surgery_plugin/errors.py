"""One exception type for every user-facing failure, and the one way to describe a cause in a line.

The CLI prints ``SurgeryError`` as a single line and exits 2 (``surgery -v`` adds the chain of
causes); anything else is a bug and keeps its traceback. Raise with ``from err`` so the cause is
kept for whoever wants it.
"""

from __future__ import annotations


class SurgeryError(ValueError):
    """Bad input or an unusable environment, described in one line that names the fix."""


class InfeasibleEdit(SurgeryError):
    """The knobs ask for an edit that cannot exist (more rows than the layer range and cap allow)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters of message), for one-line errors."""
    text = str(err).strip()
    name = type(err).__name__
    return f"{name}: {text.splitlines()[0][:limit]}" if text else name
