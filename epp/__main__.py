import sys

from infergw.epp.app import main

sys.exit(main())
