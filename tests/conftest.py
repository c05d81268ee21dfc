"""Test-session settings: the text-feature cache (deltafm.train.text_cache) lives in a temporary folder, so
tests neither read tables a user's runs left in ~/.cache nor leave any there."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("DELTAFM_CACHE_DIR", tempfile.mkdtemp(prefix="deltafm-test-cache-"))
