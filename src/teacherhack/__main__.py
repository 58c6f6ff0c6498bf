"""``python -m teacherhack`` (what ``torchrun -m`` and ``accelerate launch -m`` need)."""

import sys

from teacherhack.cli import main

sys.exit(main())
