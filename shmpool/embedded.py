"""Running a manager as a child process of this program: ``shmpool.start()``."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import subprocess
import sys
import time
from types import TracebackType

from .address import ENV_VAR, resolve, unique_address
from .client import Pool
from .envdefaults import serve_variables
from .errors import ManagerGoneError, ShmpoolError
from .sizeclass import Classes, parse_size
from .statstypes import PoolStats

__all__ = ["ManagerProcess", "check_idle_release", "start"]


class ManagerProcess:
    """A manager running in a child process; stop it with ``stop()`` or ``with``.

    Attributes:
        address: the manager's socket path (also put in ``$SHMPOOL_ADDRESS``).
        pid: the manager process id.
    """

    def __init__(self, proc: subprocess.Popen[bytes], address: str, lifeline: int) -> None:
        self._proc = proc
        self._lifeline = lifeline
        self.address = address
        self.pid = proc.pid
        self._old_env = os.environ.get(ENV_VAR)
        self._owner = os.getpid()
        os.environ[ENV_VAR] = address

    def connect(self, *, name: str = "", timeout: float = 30.0) -> Pool:
        """A new client connection to this manager (``shmpool.connect(self.address)``)."""
        return Pool(self.address, name=name, timeout=timeout)

    def stats(self) -> PoolStats:
        """The manager's statistics, through a short-lived connection (``Pool.stats()``)."""
        with self.connect(name="stats") as pool:
            return pool.stats()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the manager: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns its exit status. Calling it again, or from a forked child
        (which does not own the manager), does nothing.
        """
        if os.getpid() != self._owner:
            return None
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.address)  # only left behind if the manager was killed
        if os.environ.get(ENV_VAR) == self.address:
            if self._old_env is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = self._old_env
        return self._proc.returncode

    def __enter__(self) -> ManagerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<shmpool.ManagerProcess pid={self.pid} {self.address}>"


def start(
    min_size: int | str = "4KiB",
    max_size: int | str = "64MiB",
    memory: int | str = "1GiB",
    *,
    address: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    acquire_wait: float = 2.0,
    transit_timeout: float = 30.0,
    max_clients: int | None = None,
    max_clients_per_uid: int | None = None,
    hello_timeout: float | None = None,
    max_queued_bytes: int | str | None = None,
    client_quota: int | str | None = None,
    idle_release: float | None = None,
    log_level: str = "WARNING",
) -> ManagerProcess:
    """Start a manager in a child process and wait until it listens.

    The manager stops when ``stop()`` is called, when the ``with`` block
    ends, or when this process (and every child forked from it) has exited,
    even by SIGKILL. ``$SHMPOOL_ADDRESS`` is set to its address so that child
    processes can call ``shmpool.connect()`` without arguments. The limits
    (``max_clients`` and the rest, None: the manager's defaults) are those of
    ``shmpool serve`` and ``shmpool.Manager``. ``idle_release`` is how many
    seconds a free slot stays unused before the manager gives its pages back
    to the system (0: never; None: the manager's default, 30).

    Raises:
        ValueError, TypeError: a bad size, or a bad ``idle_release``.
        ShmpoolError: the manager failed to start (its reason in the message).
    """
    Classes(min_size, max_size)
    parse_size(memory, name="memory")
    if idle_release is not None:
        check_idle_release(idle_release)
    path = resolve(address) if address is not None else unique_address()
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    os.set_inheritable(life_w, False)
    cmd = [
        sys.executable, "-m", "shmpool", "--log-level", log_level, "serve",
        "--address", path, "--min-size", str(min_size), "--max-size", str(max_size),
        "--memory", str(memory), "--acquire-wait", str(acquire_wait),
        "--transit-timeout", str(transit_timeout),
        "--ready-fd", str(ready_w), "--lifeline-fd", str(life_r),
    ]  # fmt: skip
    for flag, value in (
        ("--max-clients", max_clients),
        ("--max-clients-per-uid", max_clients_per_uid),
        ("--hello-timeout", hello_timeout),
        ("--max-queued-bytes", max_queued_bytes),
        ("--client-quota", client_quota),
        ("--idle-release", idle_release),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(ready_w, life_r),
            start_new_session=True,
            cwd=os.path.dirname(path),  # no stray ./shmpool may shadow ours there
            env=_child_env(),
        )
    except BaseException:
        for fd in (ready_r, ready_w, life_r, life_w):
            os.close(fd)
        raise
    os.close(ready_w)
    os.close(life_r)
    try:
        status = _read_ready(ready_r, timeout)
    except BaseException:
        os.close(life_w)
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(ready_r)
    if status != "ok":
        os.close(life_w)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise ShmpoolError(f"the manager failed to start: {status or 'it exited'}")
    return ManagerProcess(proc, path, life_w)


def check_idle_release(value: object) -> float:
    """``value`` as seconds for ``idle_release``: a finite number ``>= 0``.

    Raises:
        TypeError: not a number (``bool`` too).
        ValueError: negative, NaN or infinite (0, not infinity, means never).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"idle_release must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"idle_release must be a number of seconds >= 0 (0: never), got {value}")
    return float(value)


def _child_env() -> dict[str, str]:
    """Our environment, with the directory this shmpool came from first on the path.

    The manager must run the very package this process imported (an installed
    one, or a source tree on ``sys.path``), not whatever ``python -m`` would
    find in the current directory. The ``SHMPOOL_*`` defaults of ``shmpool
    serve`` are left out: this manager's settings are ``start()``'s arguments
    (a ``SHMPOOL_METRICS_PORT`` meant for a service would clash here).
    """
    env = dict(os.environ)
    for name in serve_variables():
        env.pop(name, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _read_ready(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if left <= 0 or not poller.poll(left * 1000):
            raise ManagerGoneError(f"the manager did not start within {timeout} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
