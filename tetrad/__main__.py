import sys

from tetrad.cli import main

sys.exit(main())
