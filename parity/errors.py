"""One error type for bad input: the CLI turns it into one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class ParityInputError(Exception):
    """Bad input from the user: a missing/short/corrupt file, a wrong config key, an unusable option.

    The message must name the file or field and say what was expected, in one paragraph.
    """

    exit_code = 2


class EngineUnavailable(ParityInputError):
    """The requested engine cannot run on this machine (e.g. TurboMind without CUDA)."""


class EngineRefused(ValueError):
    """The engine would refuse this workspace at load time (TurboMind fails loudly, e.g. on LoRA byte sizes).

    Not bad user input: it is a finding about the conversion, reported in the verdict.
    """


def one_line(e: BaseException) -> str:
    """An exception's message as one line (newlines folded, ends stripped) for a one-paragraph error; "" when
    it has none."""
    return str(e).strip().replace("\n", " ")


def followable(path: Path | str, what: str = "Path") -> Path:
    """`path`, after checking it can be looked up: a symlink loop is bad input (Python's own error for it
    is a RuntimeError from `Path.resolve`, deep inside whichever stage first touches the path)."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ParityInputError(f"{what} {path} is a symlink loop: following its links never reaches a real "
                                   "file or folder; point at the real one.") from None
    except ValueError:  # a NUL byte
        raise ParityInputError(f"{what} {str(path)!r} is not a usable path (it contains a NUL byte).") from None
    return path
