"""Subcommands whose implementation has not landed yet.

They parse like the real ones will and fail with one clear line, so ``--help``
already shows the whole command surface.
"""
from __future__ import annotations

import argparse

from fedcbir.errors import FedcbirError

PENDING = {
}


def _not_yet(name: str):
    def func(args: argparse.Namespace) -> int:
        raise FedcbirError(f"'{name}' is not yet available in this version of fedcbir")

    return func


def register_fedcbir(sub) -> None:
    for name, help_text in PENDING.items():
        p = sub.add_parser(name, help=f"{help_text} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_not_yet(name))
