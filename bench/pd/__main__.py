import sys

from bench.pd.cli import main

sys.exit(main())
