"""`python -m erm ...` runs the `erm` command line (see erm/cli/)."""
import sys

from .cli import main

sys.exit(main())
