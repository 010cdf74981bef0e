"""python -m slimcore (and torchrun -m slimcore): the command line, see slimcore/pipeline/cli.py."""

import sys

from .pipeline.cli import main

sys.exit(main())
