"""``python -m attnsr`` runs the ``attnsr`` command."""

import sys

from attnsr.cli import main

sys.exit(main())
