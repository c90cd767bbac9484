"""``python -m nnc_edge`` runs the nnc-edge command line."""

import sys

from .cli import main

sys.exit(main())
