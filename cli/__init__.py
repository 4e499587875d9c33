"""The command line: ``psgrid`` and its subcommands, the one room that may import every role.

:mod:`psgrid.cli.main` builds the parser and runs a subcommand; ``jobs``,
``cluster`` and ``flags`` hold the commands and their shared flags; ``certs``
makes TLS material for ``psgrid certs``.
"""
import os

# Before anything loads torch: libgomp reads this once. Its default lets idle
# OpenMP threads spin after every tensor operation; on a host shared by a server
# and workers that spinning takes the cores the others need (a 1 MiB pull cost
# 15.6 ms spinning, 3.3 ms not: docs/benchmarks.md). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from psgrid.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
