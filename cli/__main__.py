import sys

from linearsr.main import main

sys.exit(main())
