"""`python -m farense`: the same as the `farense` command."""

import sys

from .cli import main

sys.exit(main())
