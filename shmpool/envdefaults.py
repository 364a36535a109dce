"""``SHMPOOL_*`` environment variables as the defaults of command-line options.

Every option ``--some-flag`` of ``shmpool serve`` (and the global
``--log-level``) takes its default from ``SHMPOOL_SOME_FLAG`` when that
variable is set and not empty; the flag, when given, wins. This is how a
service manager (a systemd unit's ``Environment=``, a container's ``-e``)
configures a manager without a command line of its own.

The variable's text goes to argparse as a string default, which argparse
converts with the option's ``type`` only when the flag is absent, so a bad
value is refused exactly like a bad flag, and the message names the
variable (``argument --memory: SHMPOOL_MEMORY='lots' is not a size ...``).

``SHMPOOL_ADDRESS`` is older than this and means more: every command and
``shmpool.connect()`` read it to find the manager (``shmpool.address``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "PREFIX",
    "SERVE_OPTIONS",
    "EnvValue",
    "checked",
    "env_default",
    "origin",
    "serve_variables",
    "variable",
]

T = TypeVar("T")

PREFIX = "SHMPOOL_"

#: The options of ``shmpool serve`` that read a ``SHMPOOL_*`` default
#: (``--address`` through ``shmpool.address``). ``shmpool.start()`` clears
#: these variables for its manager, whose settings are its arguments alone.
SERVE_OPTIONS = (
    "--address",
    "--min-size",
    "--max-size",
    "--memory",
    "--allow-uid",
    "--acquire-wait",
    "--transit-timeout",
    "--max-clients",
    "--max-clients-per-uid",
    "--hello-timeout",
    "--max-queued-bytes",
    "--client-quota",
    "--idle-release",
    "--metrics-port",
    "--metrics-host",
)


class EnvValue(str):
    """A default read from the environment: its text, and the variable it came from."""

    variable: str

    def __new__(cls, text: str, variable: str) -> EnvValue:
        value = super().__new__(cls, text)
        value.variable = variable
        return value


def variable(flag: str) -> str:
    """The variable that holds the default of ``flag``: ``--min-size`` -> ``SHMPOOL_MIN_SIZE``."""
    return PREFIX + flag.lstrip("-").replace("-", "_").upper()


def serve_variables() -> tuple[str, ...]:
    """The variables holding defaults of ``shmpool serve`` (not ``SHMPOOL_ADDRESS``)."""
    return tuple(variable(flag) for flag in SERVE_OPTIONS if flag != "--address")


def env_default(flag: str, default: Any, environ: Mapping[str, str] | None = None) -> Any:
    """The default of ``flag``: ``$SHMPOOL_FLAG`` as an ``EnvValue`` if set and not empty.

    Otherwise ``default`` unchanged. The option needs a ``type`` (see
    ``checked``): argparse converts a string default with it.
    """
    name = variable(flag)
    text = (os.environ if environ is None else environ).get(name, "")
    return EnvValue(text, name) if text.strip() else default


def origin(text: str) -> str:
    """``'x'`` for a value given on the command line, ``SHMPOOL_FLAG='x'`` for one from the env."""
    if isinstance(text, EnvValue):
        return f"{text.variable}={str(text)!r}"
    return repr(text)


def checked(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    """An argparse ``type``: ``convert(text)``, or an error naming the text, its origin, ``what``.

    ``convert`` signals a bad value with ``ValueError`` or ``TypeError``.
    """

    def check(text: str) -> T:
        try:
            return convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{origin(text)} is not {what}") from None

    check.__name__ = getattr(convert, "__name__", "value")
    return check
