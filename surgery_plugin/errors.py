"""One exception type for every user-facing failure.

The CLI prints ``SurgeryError`` as a single line and exits 2; anything else is a bug and keeps
its traceback.
"""


class SurgeryError(ValueError):
    """Bad input or an unusable environment, described in one line that names the fix."""
