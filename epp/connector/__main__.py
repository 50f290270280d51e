import sys

from epp.connector.app import main

sys.exit(main())
