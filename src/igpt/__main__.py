"""`python -m igpt ...` (and `torchrun -m igpt train ...`): the same as the `igpt` command."""

import sys

from igpt.cli import main

sys.exit(main())
