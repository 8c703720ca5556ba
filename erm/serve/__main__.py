"""`python -m erm.serve ARGS` runs `erm serve ARGS` (see erm/cli/serve.py)."""
import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
