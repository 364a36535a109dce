"""Where a manager listens: a Unix socket in a directory only its user can enter."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

__all__ = ["ENV_VAR", "default_address", "private_dir", "resolve", "unique_address"]

#: The environment variable that tells clients where the manager listens.
ENV_VAR = "SHMPOOL_ADDRESS"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_PATH = 107


def private_dir() -> str:
    """Return (creating it if needed) a directory that only this user can enter.

    ``$XDG_RUNTIME_DIR/shmpool`` when that is set, else ``<tmp>/shmpool-<uid>``.

    Raises:
        PermissionError: the directory exists but belongs to someone else or is
            open to others (someone may be trying to intercept the socket).
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        path = os.path.join(runtime, "shmpool")
    else:
        path = os.path.join(tempfile.gettempdir(), f"shmpool-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.getuid()}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(
            f"{path} is accessible to other users (mode {st.st_mode:o}); chmod 700 it"
        )
    return path


def default_address() -> str:
    """The socket a ``shmpool serve`` with no ``--address`` listens on."""
    return os.path.join(private_dir(), "manager.sock")


def unique_address() -> str:
    """A fresh socket path for an embedded manager."""
    return os.path.join(private_dir(), f"manager-{os.getpid()}-{os.urandom(4).hex()}.sock")


def resolve(address: str | os.PathLike[str] | None) -> str:
    """The address to connect to: the argument, else ``$SHMPOOL_ADDRESS``, else the default."""
    if address is None:
        address = os.environ.get(ENV_VAR) or default_address()
    path = os.fspath(address)
    if len(path.encode()) > MAX_PATH:
        raise ValueError(f"socket path longer than {MAX_PATH} bytes: {path!r}")
    return path
