import sys

from fastgim.cli import main

sys.exit(main())
