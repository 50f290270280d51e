import sys

from infergw.runtime.sidecar import main

sys.exit(main())
