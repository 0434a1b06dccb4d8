"""`python -m lorakit.serve ...` = `lorakit serve ...` (without loading the other commands)."""

import sys

from lorakit.cli import run_command

sys.exit(run_command("serve"))
