import sys

from infergw.controllers.app import main

sys.exit(main())
