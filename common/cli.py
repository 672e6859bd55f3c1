"""Running a command: the environment every process we start gets, and one dispatcher that
turns user errors into one line and an exit code (used by every package's command line)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from common.errors import FedcbirError
from common.flower import FLOWER_ENV


def quiet_environment() -> None:
    """Offline-safe settings for every process we start (Flower, TF logging)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


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


def run_one(register: Callable, name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m MODULE ...`` for a module that registers one ``fedcbir NAME`` subcommand:
    the same parser and error handling as ``fedcbir NAME ...`` (the leading NAME is optional)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != [name]:
        argv = [name, *argv]
    parser = argparse.ArgumentParser(prog="fedcbir")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)
