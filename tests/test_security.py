"""Access control: the socket's permissions and the SO_PEERCRED uid check."""

from __future__ import annotations

import os
import stat
import tempfile
import threading

import pytest

import shmpool

NOBODY = 65534


def _connect_as(uid: int, address: str) -> str:
    """Fork, drop to ``uid``, try to connect; return what happened as a word.

    Some callers run a manager in a thread of this process meanwhile; the
    child only switches uid, connects and exits, taking no lock that thread
    may hold.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        result = "connected"
        try:
            os.setgid(uid)
            os.setuid(uid)
            shmpool.connect(address).close()
        except shmpool.AccessDeniedError:
            result = "denied"
        except shmpool.ManagerGoneError as exc:
            result = f"gone: {exc}"
        except PermissionError:
            result = "eacces"
        except BaseException as exc:
            result = f"other: {exc!r}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="switching uid needs root")
#: The manager serves in a thread of this process while _connect_as forks.
forks_beside_a_thread = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def test_default_socket_is_private(manager: shmpool.ManagerProcess) -> None:
    st = os.stat(manager.address)
    assert stat.S_IMODE(st.st_mode) == 0o600
    parent = os.stat(os.path.dirname(manager.address))
    assert stat.S_IMODE(parent.st_mode) == 0o700
    assert st.st_uid == os.getuid()


@needs_root
def test_other_user_cannot_reach_a_private_socket(manager: shmpool.ManagerProcess) -> None:
    assert _connect_as(NOBODY, manager.address) == "eacces"


@needs_root
@forks_beside_a_thread
def test_uid_not_allowed_gets_access_denied() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        address = os.path.join(tmp, "m.sock")
        manager = shmpool.Manager(address, memory="4MiB", allow_uids=[NOBODY - 1])
        with _serving(manager):
            assert stat.S_IMODE(os.stat(address).st_mode) == 0o666
            for _ in range(5):  # the refusal must win the race with the close, every time
                assert _connect_as(NOBODY, address) == "denied"
            with shmpool.connect(address) as pool:  # our own uid is always allowed
                assert pool.stats()["clients"]


@needs_root
@forks_beside_a_thread
def test_allowed_uid_connects() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        address = os.path.join(tmp, "m.sock")
        with _serving(shmpool.Manager(address, memory="4MiB", allow_uids=[NOBODY])):
            assert _connect_as(NOBODY, address) == "connected"


class _serving:
    """Run a Manager's loop in a thread for the duration of a with block."""

    def __init__(self, manager: shmpool.Manager) -> None:
        self.manager = manager
        self.thread: threading.Thread | None = None

    def __enter__(self) -> shmpool.Manager:
        r, w = os.pipe()
        self.thread = threading.Thread(
            target=self.manager.serve, kwargs={"ready_fd": w}, daemon=True
        )
        self.thread.start()
        with os.fdopen(r) as f:
            assert f.readline().strip() == "ok"
        return self.manager

    def __exit__(self, *exc: object) -> None:
        assert self.thread is not None
        self.manager.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
