"""``python -m lrpx``: the same command line as ``lrpx``."""
import sys

from .cli import main

sys.exit(main())
