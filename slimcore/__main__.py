"""python -m slimcore (and torchrun -m slimcore): the command line, see slimcore/cli.py."""

import sys

from .cli import main

sys.exit(main())
