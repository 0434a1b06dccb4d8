"""Make tests/serve's helpers importable from tests/hardening (pytest puts only this folder on the path)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from serve_helpers import *  # noqa: E402,F401,F403
from serve_helpers import shared_model_dirs  # noqa: E402,F401
