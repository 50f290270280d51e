import sys

from infergw.bbr.app import main

sys.exit(main())
