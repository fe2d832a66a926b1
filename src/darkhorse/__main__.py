"""`python -m darkhorse ...` (and `torchrun -m darkhorse ...`): the same CLI as the `darkhorse` script."""

import sys

from darkhorse.cli import main

sys.exit(main())
