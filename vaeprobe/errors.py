"""Exceptions with one-line, actionable messages.

Every error raised for bad user input is a :class:`VaeprobeError`; the CLI prints its message as a
single line (``vaeprobe: error: ...``) and exits with status 2 instead of showing a traceback.
"""


class VaeprobeError(Exception):
    """Base class: the message says what is wrong and what to do."""


class VAELoadError(VaeprobeError):
    """A VAE spec could not be resolved or loaded."""


class ImageLoadError(VaeprobeError):
    """An image could not be read (the reason is in the message)."""


class SetupError(VaeprobeError):
    """An offline asset (e.g. LPIPS weights) is missing and could not be prepared."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for a user: our own errors by their message, others prefixed with their type.

    >>> one_line(RuntimeError("out of memory\\nCUDA details"))
    'RuntimeError: out of memory'
    >>> one_line(VAELoadError("no such file"))
    'no such file'
    """
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    if isinstance(exc, VaeprobeError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
