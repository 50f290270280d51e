import sys

from infergw.connector.app import main

sys.exit(main())
