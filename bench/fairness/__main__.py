import sys

from bench.fairness.cli import main

sys.exit(main())
