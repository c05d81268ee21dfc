"""``python -m deltafm.study``: the same as ``deltafm compare``."""

import sys

from deltafm.study.cli import main

sys.exit(main())
