"""``python -m fedcbir.study [study] ...`` = ``fedcbir study ...`` (``fedcbir.study.cli.main``).

May import: ``fedcbir.study.cli`` only.
"""
from __future__ import annotations

import sys

from fedcbir.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
