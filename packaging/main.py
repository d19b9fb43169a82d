# Entry point of the single binary.
import sys

from esr.cli import main

sys.exit(main())
