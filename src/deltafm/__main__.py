"""``python -m deltafm ...`` (also under ``torchrun -m deltafm train ...``): the ``deltafm`` command."""

import sys

from deltafm.cli import main

if __name__ == "__main__":
    sys.exit(main())
