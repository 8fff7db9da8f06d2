"""``python -m bierasing``: the same as the ``bierasing`` command."""

import sys

from .cli import main

sys.exit(main())
