"""`python -m distnn.plot`: the command's short name; the tool is distnn.tools.plot."""

import sys

from distnn.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
