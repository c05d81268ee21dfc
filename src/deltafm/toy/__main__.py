"""``python -m deltafm.toy ...`` = ``deltafm toy ...``."""

import sys

from deltafm.toy.cli import main

sys.exit(main())
