"""This process's parent as distnn was first imported: imported first of all the package's
modules (distnn/__init__.py), before torch's imports take their seconds, so that a launcher
killed during them is still seen gone (distnn.distributed.launcher_watch)."""

import os

STARTED = (os.getpid(), os.getppid())  # (this process, its parent) at the first import
