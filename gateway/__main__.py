"""``python -m gateway`` is the ``portvakt`` command."""

import sys

from gateway.cli import main

sys.exit(main())
