"""The edge of every `python -m impl NAME` entry point: argparse `type=` checks and the parser's name.

Each helper turns one command-line string into a value or raises `argparse.ArgumentTypeError`, so the parser
prints one `error: argument --NAME: ...` line and exits with code 2 before any work starts. Paths are checked the
same way: an output folder must be creatable and writable, an input file must exist.
"""

import argparse
import math
import os
from pathlib import Path

# Set by `python -m impl NAME` so that every usage line names the command the user typed.
_prog: str | None = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block above it
        self.exit(2, f"error: {message}  ({self.prog} --help)\n")


def parser(module: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage says `python -m impl NAME` when run that way, else `python -m MODULE`, and
    whose errors are one `error:` line with exit code 2."""
    prog = _prog or f"python -m {module.removesuffix('.__main__')}"
    return _Parser(prog=prog, description=description)


def _bad(expected: str, value: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {expected}, got {value!r}")


def _int(value: str, expected: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise _bad(expected, value) from None
    if number < low:
        raise _bad(expected, value)
    return number


def int_at_least(low: int):
    """A `type=` for ints >= `low` (a class count needs 2)."""

    def check(value: str) -> int:
        return _int(value, f"an int >= {low}", low)

    return check


def positive_int(value: str) -> int:
    return _int(value, "an int >= 1", 1)


def non_negative_int(value: str) -> int:
    return _int(value, "an int >= 0", 0)


def finite_float(value: str, expected: str = "a finite number") -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(expected, value) from None
    if not math.isfinite(number):
        raise _bad(expected, value)
    return number


def positive_float(value: str) -> float:
    number = finite_float(value, "a finite number > 0")
    if number <= 0:
        raise _bad("a finite number > 0", value)
    return number


def non_negative_float(value: str) -> float:
    number = finite_float(value, "a finite number >= 0")
    if number < 0:
        raise _bad("a finite number >= 0", value)
    return number


def probability(value: str) -> float:
    """A number in [0, 1]."""
    number = finite_float(value, "a number in [0, 1]")
    if not 0 <= number <= 1:
        raise _bad("a number in [0, 1]", value)
    return number


def open_unit_interval(value: str) -> float:
    """A number in (0, 1): a held-out fraction."""
    number = finite_float(value, "a number in (0, 1)")
    if not 0 < number < 1:
        raise _bad("a number in (0, 1)", value)
    return number


def unit_interval(value: str) -> float:
    """A number in [0, 1): dropout, Adam's betas."""
    number = finite_float(value, "a number in [0, 1)")
    if not 0 <= number < 1:
        raise _bad("a number in [0, 1)", value)
    return number


def _writable_parent(path: Path, value: str) -> None:
    """The nearest existing folder above `path` must be a folder this process may create entries in."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"must be a writable location, got {value!r} ({str(parent)!r} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"must be a writable location, got {value!r} ({str(parent)!r} is read-only)")


def writable_dir(value: str) -> Path:
    """An output folder: an existing writable folder, or one that can be created."""
    path = Path(value)
    if path.exists():
        if not path.is_dir():
            raise _bad("a folder (it holds several outputs)", f"{value} (an existing file)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise _bad("a writable folder", f"{value} (read-only)")
        return path
    _writable_parent(path, value)
    return path


def writable_file(value: str) -> Path:
    """An output file: not a folder, and either writable or creatable."""
    path = Path(value)
    if path.is_dir():
        raise _bad("a file path", f"{value} (an existing folder)")
    if path.exists() and not os.access(path, os.W_OK):
        raise _bad("a writable file", f"{value} (read-only)")
    _writable_parent(path, value)
    return path


def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise _bad("an existing file", value)
    return path


def existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise _bad("an existing folder", value)
    return path


def device(value: str) -> str:
    """auto, cpu, cuda or cuda:N, and present on this machine."""
    from impl.common.device import resolve_device

    try:
        resolve_device(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value
