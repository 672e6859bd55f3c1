"""``edge-client``: turn this machine into a device of a profile and join a SuperLink.

``edge-client --profile rpi4 --framework torch --superlink HOST:PORT --root-certificates ca.pem
--auth-key KEY --catalog ROOT --partition-id 0 --num-partitions 3`` runs a Flower SuperNode
(see :mod:`edge_client.deploy`); ``edge-client keygen DIR`` makes a device key pair.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.cli import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-client",
        description="Join a fedcbir federation (a 'fedcbir server' SuperLink) as one edge device: applies the "
                    "device profile (one training thread; cgroup v1 CPU/memory limits where available), runs a "
                    "Flower SuperNode with this device's framework, profile, catalog and partition, prints one "
                    "line per round, and stops cleanly on Ctrl-C / SIGTERM. "
                    "'edge-client keygen DIR' makes a device key pair for --auth-key.",
        epilog="example: edge-client --profile rpi4 --framework torch --superlink 192.168.1.10:9092 "
               "--root-certificates ca.pem --auth-key keys/pi-kitchen --sample --partition-id 0 --num-partitions 3",
    )
    parser.add_argument("--profile", default="rpi4", help="device profile name or .toml path (default rpi4)")
    parser.add_argument("--framework", choices=["torch", "tf", "jax"], default="torch")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="address of the SuperLink")
    parser.add_argument("--catalog", metavar="ROOT", help="catalog root (ABO layout), the same catalog as the server's")
    parser.add_argument("--sample", action="store_true", help="use the built-in sample catalog")
    parser.add_argument("--partition-id", type=int, required=True, help="this device's partition, 0..N-1")
    parser.add_argument("--num-partitions", type=int, required=True, help="N: how many devices share the data")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", metavar="CA.pem",
                     help="the server's CA certificate (printed by 'fedcbir server'); default: the system store")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (only for a server started with --insecure)")
    parser.add_argument("--auth-key", metavar="KEY", help="this device's private key (edge-client keygen), for a "
                                                          "server started with --require-auth")
    parser.add_argument("--port", type=int, metavar="LOCALPORT",
                        help="local port of the SuperNode's runtime API (default: a free one)")
    parser.add_argument("--max-retries", type=int, default=5,
                        help="connection retries per request before giving up (default 5, about 30 s)")
    parser.add_argument("--reconnect-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="after losing a SuperLink it was connected to (server restarted), keep trying this "
                             "long (default 600; 0 = exit)")
    parser.add_argument("--limits", choices=["auto", "memory", "none"], default="auto",
                        help="cgroup v1 limits: auto = CPU quota + memory when possible, memory = memory only, "
                             "none = emulator checks only (default auto)")
    parser.add_argument("--log", metavar="FILE", help="append the SuperNode's full output to FILE")
    parser.add_argument("--verbose", action="store_true", help="also print the SuperNode's output")
    parser.set_defaults(func=cmd_join)
    return parser


def build_keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-client keygen",
                                description="Make a device key pair (ECDSA P-384, OpenSSH format) for SuperNode "
                                            "authentication: DIR/NAME (private) and DIR/NAME.pub (register it).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", help="key name (default: this host's name)")
    p.set_defaults(func=lambda a: _keygen(a))
    return p


def _keygen(args: argparse.Namespace) -> int:
    from edge_client.deploy import keygen

    return keygen(args.dir, args.name)


def cmd_join(args: argparse.Namespace) -> int:
    from edge_client.deploy import JoinOptions, join
    from models.centralized import _resolve_catalog

    catalog = _resolve_catalog(args).expanduser().resolve()
    opts = JoinOptions(superlink=args.superlink, profile=args.profile, framework=args.framework, catalog=catalog,
                       partition_id=args.partition_id, num_partitions=args.num_partitions, insecure=args.insecure,
                       root_certificates=args.root_certificates, auth_key=args.auth_key, port=args.port,
                       max_retries=args.max_retries, reconnect_timeout=args.reconnect_timeout, limits=args.limits,
                       log=Path(args.log) if args.log else None, verbose=args.verbose)
    return join(opts, say=lambda s: print(s, flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keygen"]:
        return run(build_keygen_parser(), argv[1:])
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
