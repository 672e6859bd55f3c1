"""``python -m fedcbir.demo ...`` = ``fedcbir demo ...``."""
import sys

from fedcbir.demo.cli import main

sys.exit(main())
