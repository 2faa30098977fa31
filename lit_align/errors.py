"""The errors lit_align raises for a mistake in a configuration or in data.

Both subclass :class:`ValueError` (code that catches ``ValueError`` keeps working) and
:class:`LitAlignError`, which the ``lit-align`` command shows as one message with no traceback
and exit code 2. ``--debug`` or ``LIT_ALIGN_DEBUG=1`` brings the traceback back.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ConfigError", "DataError", "LitAlignError", "MissingPathError", "check_choice", "check_int", "check_number", "require", "debug_requested", "describe",
           "find_known_error", "one_message_errors"]

#: Exit status of a run stopped by a configuration or data error (argparse's status for bad usage).
EXIT_CODE = 2
#: Environment variable that keeps tracebacks (any value but ``""`` and ``"0"``).
DEBUG_ENV = "LIT_ALIGN_DEBUG"


class LitAlignError(Exception):
    """A mistake the user can fix in the config or the data; its message names the key or record and the fix."""


class ConfigError(LitAlignError, ValueError):
    """A configuration value lit_align cannot run with (the message names the config key)."""


class DataError(LitAlignError, ValueError):
    """A data source or record lit_align cannot use (the message names the source and the record)."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A configured file, directory or hub id that does not exist or cannot be loaded (also a
    :class:`FileNotFoundError`, so code that catches ``OSError`` keeps working)."""


def require(ok: bool, key: str, rule: str, value: object) -> None:
    """Refuse a setting: ``ConfigError("<key> must be <rule>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def check_int(key: str, value: object, low: int = 1, *, optional: bool = False) -> None:
    """Refuse anything but an int >= ``low`` (``None`` too when ``optional``) for the setting ``key``."""
    if optional and value is None:
        return
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low, key,
            f"an int >= {low}{' or null' if optional else ''}", value)


def check_number(key: str, value: object, *, minimum: float | None = None, positive: bool = False) -> None:
    """Refuse anything but a finite number (not a bool) for the setting ``key``; ``> 0`` with ``positive``,
    ``>= minimum`` when given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    rule = "a finite number"
    if positive:
        ok, rule = ok and value > 0, rule + " > 0"
    elif minimum is not None:
        ok, rule = ok and value >= minimum, f"{rule} >= {minimum:g}"
    require(ok, key, rule, value)


def check_choice(key: str, value: object, options: tuple[str, ...]) -> None:
    """Refuse a value of the setting ``key`` that is not one of ``options``."""
    require(value in options, key, f"one of {', '.join(repr(o) for o in options)}", value)


def find_known_error(error: BaseException) -> LitAlignError | None:
    """The :class:`LitAlignError` that caused ``error``: itself or one in its ``__cause__``/``__context__``
    chain (jsonargparse and Lightning re-raise errors from constructors and hooks wrapped in their own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitAlignError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _raised_in(error: BaseException) -> str | None:
    """Name of the class whose constructor raised ``error`` (a loss, a spec...), from its traceback."""
    owner = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name in ("__init__", "__post_init__") and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
    return owner


def describe(error: LitAlignError) -> str:
    """The one message shown for ``error``: its text, after the class that refused the value when the text
    does not already start with a config key (``model.``, ``data.``)."""
    text = str(error)
    owner = _raised_in(error)
    if owner is None or text.startswith(("model", "data", "trainer")):
        return text
    return f"{owner}: {text}"


def debug_requested(argv: list[str]) -> bool:
    """Whether tracebacks are wanted: ``--debug`` among the arguments or ``LIT_ALIGN_DEBUG`` set (not 0)."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def one_message_errors(debug: bool = False) -> Iterator[None]:
    """Show a :class:`LitAlignError` raised in the block (or wrapped by a library) as one line on stderr and
    exit with :data:`EXIT_CODE`; with ``debug`` every error keeps its traceback."""
    try:
        yield
    except Exception as error:
        known = None if debug else find_known_error(error)
        if known is None:
            raise
        print(f"error: {describe(known)}", file=sys.stderr)
        print(f"(fix the configuration or the data and run again; --debug or {DEBUG_ENV}=1 shows where it was "
              "raised)", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None
