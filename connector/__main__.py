import sys

from connector.app import main

sys.exit(main())
