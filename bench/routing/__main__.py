import sys

from infergw.bench.routing.cli import main

sys.exit(main())
