import sys

from infergw.fetch.tokenizer import main

sys.exit(main())
