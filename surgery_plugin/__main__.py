"""``python -m surgery_plugin``: the ``surgery`` command."""

import sys

from .commands.cli import main

sys.exit(main())
