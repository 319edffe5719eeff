"""`python -m energy_gpt.recipes.compare ...` = `energy-gpt compare ...`."""

import sys

from .cli import main

sys.exit(main())
