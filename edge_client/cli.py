"""``edge-client``: turn this machine into a device of a profile and join a SuperLink."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedcbir.cli import run
from fedcbir.errors import FedcbirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-client",
        description="Join a fedcbir federation as an emulated edge device (e.g. --profile rpi4).",
    )
    parser.add_argument("--profile", default="rpi4", help="device profile name (see device_profiles/)")
    parser.add_argument("--framework", choices=["torch", "tf", "jax"], default="torch")
    parser.add_argument("--superlink", help="HOST:PORT of the SuperLink")
    parser.add_argument("--catalog", help="catalog root (ABO layout)")
    parser.add_argument("--partition-id", type=int)
    parser.add_argument("--num-partitions", type=int)

    def not_yet(args):
        raise FedcbirError("edge-client is not yet available in this version of fedcbir")

    parser.set_defaults(func=not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
