"""``python -m zocalo_xrc``: the ``zocalo-xrc`` command."""

import sys

from .cli import main

sys.exit(main())
