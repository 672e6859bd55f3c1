"""The ``fedcbir`` umbrella command.

Each package owns its subcommands in a ``cli`` module with a ``register(subparsers)``
function; those modules import only light things, so ``fedcbir --help`` is fast and
no framework is imported before a command needs it.  The dispatcher itself (one-line
errors, exit codes, the quiet environment) is ``common.cli``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from common import __version__
from common.cli import run, run_one  # noqa: F401 - run/run_one: `fedcbir.cli.run(parser, argv)` in tests

# (module, register-function) pairs, in the order they appear in --help.
_REGISTRARS = [
    ("catalog.cli", "register"),
    ("models.cli", "register"),
    ("models.centralized", "register"),
    ("fedcbir.simulate", "register"),
    ("export.cli", "register"),
    ("server.deploy", "register"),
    ("fedcbir.demo.cli", "register"),
    ("fedcbir.study.cli", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcbir",
        description="Federated product-image search for the Amazon Berkeley Objects catalog.",
    )
    parser.add_argument("--version", action="version", version=f"fedcbir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module, func in _REGISTRARS:
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
