import sys

from infergw.simulator.app import main

sys.exit(main())
