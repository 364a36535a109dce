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

Committing: ``ftruncate`` beyond the free space of ``/dev/shm`` succeeds, and
the first touch of a missing page then kills the toucher with SIGBUS. So no
slot is handed out before the manager has backed its pages with
``posix_fallocate`` (``commit``), which fails cleanly with ENOSPC; that becomes
``PoolExhaustedError``, never a SIGBUS in a worker. A segment is created with
only its ticket words backed; the arena commits slots as it grants them and
gives the pages of long-free slots back (``decommit``).

Decommitting: on tmpfs, ``madvise(MADV_REMOVE)`` over a shared mapping punches
a hole in the file, like ``fallocate(PUNCH_HOLE)``: the pages are freed at once
and dropped from every process's mapping, and a later touch would fault in a
fresh zero page (a new allocation). We use ``madvise``, which the standard
library offers, on a mapping the manager keeps of the whole segment (it
costs address space only: the manager never touches a slot's bytes). Clients
map segments without ``MAP_POPULATE``: populating a mapping faults in every
page, holes included, which would commit free slots again.
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

__all__ = ["NAME_PREFIX", "PAGE", "ShmSegment", "map_segment", "sweep_orphans"]

NAME_PREFIX = "shmpool."
_SHM_DIR = "/dev/shm"
_counter = itertools.count(1)
#: The unit of committing and decommitting memory.
PAGE = mmap.PAGESIZE


class ShmSegment:
    """An anonymous (already unlinked) shared-memory segment, owned by its fd.

    Only its first ``header`` bytes (the ticket words) are backed at birth;
    ``commit`` and ``decommit`` back and free the pages of any other range.
    """

    fd: int = -1
    tickets: memoryview | None = None
    _map: mmap.mmap | None = None

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
            self._map = mmap.mmap(self.fd, size)  # address space only: never populated
            if header:  # the manager reads and writes the ticket words only
                self.commit(0, header)
                self.tickets = memoryview(self._map)[:header]
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise _exhausted(size, exc) from None
            raise

    def commit(self, offset: int, length: int) -> None:
        """Back ``length`` bytes from ``offset`` with memory (zeroed if they were not).

        Raises:
            PoolExhaustedError: ``/dev/shm`` has no room for them.
        """
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _exhausted(length, exc) from None
            raise

    def decommit(self, offset: int, length: int) -> None:
        """Free the pages of ``length`` bytes from ``offset`` (page-aligned) in every process."""
        assert self._map is not None
        self._map.madvise(mmap.MADV_REMOVE, offset, length)

    def committed(self) -> int:
        """Bytes of this segment backed by memory now (what ``/dev/shm`` counts)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.tickets is not None:
            self.tickets.release()
            self.tickets = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<ShmSegment fd={self.fd} size={self.size}>"


_FULL = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def _exhausted(size: int, exc: OSError) -> PoolExhaustedError:
    return PoolExhaustedError(
        f"cannot commit {size} bytes of shared memory ({exc.strerror}): "
        f"{_SHM_DIR} is full; enlarge it or lower the manager's memory"
    )


def map_segment(fd: int, size: int) -> mmap.mmap:
    """Map a segment read-write; pages fault in as this process first touches them.

    Not ``MAP_POPULATE``: that would fault in the holes of decommitted slots
    too, committing memory nobody asked for.
    """
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):  # do not keep a dup of the fd per mapping
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, trackfd=False)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)


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
