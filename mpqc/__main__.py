import sys

from mpqc.cli import main

sys.exit(main())
