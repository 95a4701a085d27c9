"""`python -m diffusers_goca ...`: the `goca` command."""

import sys

from .cli import main

sys.exit(main())
