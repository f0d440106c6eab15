"""``python -m factscope``: the command line."""

import sys

from factscope.cli import main

sys.exit(main())
