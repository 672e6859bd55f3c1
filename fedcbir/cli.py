"""The ``fedcbir`` umbrella command.

Each package owns its subcommands in a ``cli`` module with a ``register(subparsers)``
function; those modules import only light things, so ``fedcbir --help`` is fast and
no framework is imported before a command needs it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from fedcbir import __version__
from fedcbir.errors import FedcbirError

# (module, register-function) pairs, in the order they appear in --help.
_REGISTRARS = [
    ("catalog.cli", "register"),
    ("models.cli", "register"),
    ("models.centralized", "register"),
    ("fedcbir.simulate", "register"),
    ("export.cli", "register"),
    ("server.deploy", "register"),
    ("fedcbir.demo", "register"),
    ("fedcbir.study", "register"),
]

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_environment() -> None:
    """Offline-safe settings for every process we start (Flower, TF logging)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


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


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, dispatch to ``args.func`` and turn user errors into one line + exit code."""
    quiet_environment()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except FedcbirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def run_one(register: Callable, name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m MODULE ...`` for a module that registers one ``fedcbir NAME`` subcommand:
    the same parser and error handling as ``fedcbir NAME ...`` (the leading NAME is optional)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != [name]:
        argv = [name, *argv]
    parser = argparse.ArgumentParser(prog="fedcbir")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
