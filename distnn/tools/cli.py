"""What the small tools' command lines share: a parser whose mistakes are one line."""

from __future__ import annotations

import argparse

from distnn.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError ("...; see PROG --help") for the
    tool's main to print in one line and exit 2, instead of argparse's usage and exit."""

    def error(self, message: str) -> None:
        raise UsageError(f"{message}; see {self.prog} --help")
