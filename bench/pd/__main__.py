import sys

from infergw.bench.pd.cli import main

sys.exit(main())
