"""The command line: ``psgrid`` and its subcommands, the one room that may import every role.

:mod:`psgrid.cli.main` builds the parser and runs a subcommand; ``jobs``,
``cluster`` and ``flags`` hold the commands and their shared flags; ``certs``
makes TLS material for ``psgrid certs``.
"""
from psgrid.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
