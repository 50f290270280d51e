import sys

from epp.app import main

sys.exit(main())
