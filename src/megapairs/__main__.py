"""`python -m megapairs ...` (and `accelerate launch -m megapairs train ...`)."""

import sys

from megapairs.cli import main

sys.exit(main())
