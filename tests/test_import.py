"""The core import stays light: no training / plotting / evaluation libraries."""

import subprocess
import sys

HEAVY = ["tqdm", "yaml", "matplotlib", "scipy", "sklearn", "tensorboard", "PIL"]


def test_core_import_is_light():
    code = (
        "import sys, deltafm; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(','.join(heavy)); "
        "assert callable(deltafm.contrastive_flow_matching_loss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import deltafm pulled in: {out.stdout.strip()}"
