"""Creating and mapping shared-memory segments.

Why segments are unlinked at birth: a named POSIX shared-memory object lives
in ``/dev/shm`` until someone unlinks it, so a manager killed with SIGKILL
would leak every segment it named. We create each segment with ``posix_ipc``
(``O_CREX``, mode 0600), unlink its name at once, and from then on know it only
by its file descriptor, which travels to clients over the socket
(SCM_RIGHTS). The kernel frees the memory when the last descriptor and the
last mapping are gone, whoever dies first. The only window is between create
and unlink (microseconds); ``sweep_orphans`` removes names a dead manager left
in that window.

Reservation: ``ftruncate`` beyond the free space of ``/dev/shm`` succeeds, and
the first touch of a missing page then kills the toucher with SIGBUS. So the
manager reserves every page with ``posix_fallocate``, which fails cleanly with
ENOSPC; that becomes ``PoolExhaustedError``, never a SIGBUS in a worker.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import secrets
import sys

import posix_ipc

from .errors import PoolExhaustedError

__all__ = ["NAME_PREFIX", "ShmSegment", "map_segment", "sweep_orphans"]

NAME_PREFIX = "shmpool."
_SHM_DIR = "/dev/shm"
_counter = itertools.count(1)
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class ShmSegment:
    """An anonymous (already unlinked) shared-memory segment, owned by its fd."""

    fd: int = -1
    tickets: memoryview | None = None
    _header_map: mmap.mmap | None = None

    def __init__(self, size: int, header: int = 0) -> None:
        name = f"/{NAME_PREFIX}{os.getpid()}.{next(_counter)}.{secrets.token_hex(4)}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        try:
            shm.unlink()
        finally:
            self.fd = shm.fd
        self.size = size
        try:
            os.ftruncate(self.fd, size)
            os.posix_fallocate(self.fd, 0, size)
            if header:  # the manager reads and writes the ticket words only
                self._header_map = mmap.mmap(self.fd, header)
                self.tickets = memoryview(self._header_map)
        except OSError as exc:
            self.close()
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise PoolExhaustedError(
                    f"cannot reserve {size} bytes of shared memory ({exc.strerror}): "
                    f"{_SHM_DIR} is full; enlarge it or lower the manager's memory"
                ) from None
            raise

    def close(self) -> None:
        if self.tickets is not None:
            self.tickets.release()
            self.tickets = None
        if self._header_map is not None:
            self._header_map.close()
            self._header_map = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<ShmSegment fd={self.fd} size={self.size}>"


def map_segment(fd: int, size: int) -> mmap.mmap:
    """Map a segment read-write, faulting its pages in now rather than on first use."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):  # do not keep a dup of the fd per mapping
        return mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=prot, trackfd=False)
    return mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=prot)


def sweep_orphans() -> list[str]:
    """Unlink ``/dev/shm`` names left by managers that died between create and unlink."""
    removed: list[str] = []
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            pid = int(name[len(NAME_PREFIX) :].split(".", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + name)
            removed.append(name)
        except posix_ipc.Error:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
