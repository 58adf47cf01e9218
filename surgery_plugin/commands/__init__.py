"""The ``surgery`` command (``cli``: argparse and dispatch) and the jobs it runs: ``demo``, ``evaluate``,
``stack``, ``tune/`` and ``compare/``."""
