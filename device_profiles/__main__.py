"""``python -m device_profiles {list,show,calibrate}``: inspect profiles, calibrate this host."""
from __future__ import annotations

import argparse
import json
import sys

from common.errors import FedcbirError

from .calibration import calibration_path, describe, load_or_calibrate
from .profiles import list_profiles, load_profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_profiles", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="list the built-in device profiles")
    p_list.add_argument("--json", action="store_true")
    p_show = sub.add_parser("show", help="show one profile (built-in name or .toml path)")
    p_show.add_argument("profile")
    p_show.add_argument("--json", action="store_true")
    p_cal = sub.add_parser("calibrate", help="measure this host for the virtual clock (cached)")
    p_cal.add_argument("--force", action="store_true", help="measure again even if a valid cache exists")
    p_cal.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            profiles = [load_profile(n) for n in list_profiles()]
            if args.json:
                print(json.dumps([q.to_dict() for q in profiles], indent=2, sort_keys=True))
            else:
                for q in profiles:
                    print(f"{q.name:16s} {q.description}")
        elif args.cmd == "show":
            q = load_profile(args.profile)
            if args.json:
                print(json.dumps(q.to_dict(), indent=2, sort_keys=True))
            else:
                for key, value in q.to_dict().items():
                    if key != "sources":
                        print(f"{key}: {value}")
        else:
            cal = load_or_calibrate(force=args.force)
            if args.json:
                print(json.dumps(cal.to_dict(), indent=2, sort_keys=True))
            else:
                print(f"{describe(cal)}; cache {calibration_path()}")
    except FedcbirError as e:
        print(f"error: {e}", file=sys.stderr)
        return FedcbirError.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
