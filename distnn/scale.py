"""`python -m distnn.scale`: the command's short name; the tool is distnn.tools.scale."""

import sys

from distnn.tools.scale import main

if __name__ == "__main__":
    sys.exit(main())
