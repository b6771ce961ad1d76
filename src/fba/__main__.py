"""``python -m fba``: the ``fba`` command, where the console script is not on the PATH."""

import sys

from fba.cli import main

sys.exit(main())
