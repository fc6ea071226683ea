"""The one base class for a user's mistake: a bad file, a bad value, a bad option.

Every reader and option check in the project raises a subclass of :class:`InputError` with a one-line message that
names the file (and line, where there is one), what was expected and how to fix it.  The apps report an InputError
as that one line on stderr and exit non-zero without writing metrics.json; any other exception is a bug and keeps its
traceback.

It lives in ``observables`` because both ``observables`` and ``guidance`` raise it and ``observables`` must not
import ``guidance`` (DESIGN.md's dependency rule); ``predictors`` raise their own errors, which the app translates.
InputError is a ValueError, so code that caught ValueError from a reader keeps working.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A problem with the user's input (file, value or option), reported as one line."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A data or structure file that is not there."""


def where(path: str | Path | None, line: int | None = None) -> str:
    """``file:line`` (or ``file``, or '') for the start of a message."""
    if path is None:
        return ""
    return f"{path}:{line}" if line is not None else f"{path}"


def require_file(path: str | Path, what: str = "file", option: str | None = None) -> Path:
    """``path`` as a Path when it is an existing file, else an InputFileNotFound that names ``what`` and ``option``."""
    p = Path(path)
    if not p.is_file():
        hint = f" (set {option})" if option else ""
        state = "is a directory" if p.is_dir() else "not found"
        raise InputFileNotFound(f"{what} {p}: {state}{hint}")
    return p


def unknown_option(exc: TypeError) -> str | None:
    """The keyword a ``TypeError`` from calling a factory or builder with ``**options`` says it does not take
    ("... got an unexpected keyword argument 'qmax'" -> "qmax"), or None for any other TypeError (a bug)."""
    text = str(exc)
    if "unexpected keyword argument" not in text:
        return None
    return text.split("unexpected keyword argument")[-1].strip(" '\"")
