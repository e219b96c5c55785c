import sys

from segvol.cli import main

sys.exit(main())
