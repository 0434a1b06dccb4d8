"""`python -m lorakit.serve ...` = `lorakit serve ...` (without loading the other commands)."""

import sys

from lorakit.serve.cli import main

sys.exit(main())
