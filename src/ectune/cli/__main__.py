"""`python -m ectune.cli COMMAND ...` (what torchrun runs: `torchrun ... -m ectune.cli tune ...`)."""

import sys

from . import main

sys.exit(main())
