import sys

from infergw.bench.fairness.cli import main

sys.exit(main())
