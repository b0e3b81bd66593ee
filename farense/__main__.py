"""`python -m farense`: the same as the `farense` command."""

import sys

from farense.cli import main

sys.exit(main())
