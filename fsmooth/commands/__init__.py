"""The ``fsmooth`` subcommands: one module per command, each with ``add_parser(subparsers)`` and ``run(args)``.

:mod:`fsmooth.cli` lists them in :data:`fsmooth.cli.COMMANDS` (``eval`` is :mod:`fsmooth.evaluation.cli`);
the argparse value types they share are in :mod:`.argtypes`.
"""
