"""``python -m attnformat`` runs the command line."""

import sys

from attnformat.cli import main

sys.exit(main())
