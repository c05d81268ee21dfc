"""The core import stays light: beyond torch itself, no training / plotting / evaluation libraries."""

import subprocess
import sys

HEAVY = ["tqdm", "yaml", "matplotlib", "scipy", "sklearn", "tensorboard", "PIL", "deltafm.train", "deltafm.models"]


def test_core_import_is_light():
    code = (
        "import sys, torch; before = set(sys.modules); import deltafm; "
        "new = set(sys.modules) - before; "
        f"heavy = sorted(m for m in new if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}); "
        "print(','.join(heavy)); "
        "assert callable(deltafm.contrastive_flow_matching_loss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import deltafm pulled in: {out.stdout.strip()}"
