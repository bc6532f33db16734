"""``python -m sdml_ext.search``: see :mod:`sdml_ext.search.cli`."""

import sys

from .. import cli
from .cli import main

sys.exit(cli.run(main))
