"""``python -m sdml_ext.search``: see :mod:`sdml_ext.cli.search`."""

import sys

from ..cli import run
from ..cli.search import main

sys.exit(run(main))
