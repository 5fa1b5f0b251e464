"""What kvctl and kvtop share: one-line argument errors, number parsing, and how an error is printed."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A command line argparse cannot parse."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message, and no exit inside the shell
        raise UsageError(f"{message} (see '{self.prog} --help')")


def number(text: str) -> float:
    """float(text), or NaN (which fails every range check) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def positive_float(text: str) -> float:
    value = number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def print_error(prefix: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__  # always one line
    print(prefix + text, file=sys.stderr, flush=True)
