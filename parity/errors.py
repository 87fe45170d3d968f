"""One error type for bad input: the CLI turns it into one paragraph and exit code 2, never a traceback."""

from __future__ import annotations


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
