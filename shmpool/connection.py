"""A client's connection to the manager: the socket, requests and replies, notices, prefetches.

One ``Connection`` per ``Pool``, holding what lives and dies with the socket:
the lock every caller takes to talk to the manager, the request counter,
the segments the manager sent (mapped here), the handoff notices not sent
yet, and the prefetches not answered yet. It knows nothing of caches or
leases: a message that answers no request a caller waits for (a ``Recall``,
a prefetch's answer) goes to ``on_unasked``, a lost connection calls
``on_lost``, and the first notice queued calls ``on_notice`` (the pool
starts its janitor, which sends the queue within ``JANITOR_PERIOD``), and
a call from a forked child calls ``on_forked`` (the pool starts over,
calling ``forget_parent``).

Every method but ``live`` and ``readable`` expects the caller to hold
``lock``. The C extension reads ``lock``, ``sock``, ``pid``, ``closed``,
``broken``, ``segments``, ``notices``, ``claims``, ``client_id``,
``tickets_on`` and ``instance`` by name, and calls ``flush_notices`` and
``on_notice`` (see ``_speedups.c``, "Connection and Lending").

Fork. A forked child must never talk through its parent's socket (the
manager keys leases by connection, and replies would go to whichever process
reads first); ``forget_parent`` drops it without shutting it down, and the
next call opens the child's own.

Restart. When the manager hangs up (end-of-file, a reset, a broken pipe: it
exited, or was killed) the connection is broken like any lost one, and
``hung_up`` says so. If ``reconnect`` allows, the next call that needs the
manager (``ensure``) connects again to the same address (``reopen``), trying
for ``reconnect`` seconds with growing pauses, and goes on with whatever
manager answers there, provided it is another run (a new ``instance``) with
the same size classes. What belonged to the old manager is dropped first:
its segments are unmapped here (a mapping a lease still uses stays until that
lease is gone: the kernel keeps the memory while it is mapped), and queued
notices, claims and prefetches are forgotten; ``on_reconnected`` tells the
pool. A manager that is still the same run (it closed this connection on
purpose), one that does not answer in time, and a pool whose janitor failed
are not reconnected: they break the pool for good, as without ``reconnect``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from . import protocol as p
from .errors import (
    AccessDeniedError,
    ManagerGoneError,
    PoolClosedError,
    ProtocolError,
    ShmpoolError,
    error_from_code,
)
from .segment import map_segment

__all__ = ["NOTICE_BATCH", "Connection", "close_fds", "readable"]

#: Handoff notices a process keeps before it sends them in one message. They
#: also go out with the next request, and within ``JANITOR_PERIOD`` anyway.
NOTICE_BATCH = 64

_ANCBUF = socket.CMSG_SPACE(p.MAX_FDS * 4)

#: What ``on_unasked`` gets: a decoded message and the descriptors that came with it.
Unasked = Callable[[p.Message, list[int]], None]

#: Seconds a pool tries to reach a restarted manager, by default (``reconnect=True``).
RECONNECT_WAIT = 2.0
#: The first pause between two tries; each pause doubles, up to ``RECONNECT_MAX_PAUSE``.
RECONNECT_FIRST_PAUSE = 0.02
RECONNECT_MAX_PAUSE = 0.5


class _Segment:
    """A segment mapped in this process: its slots, and its ticket words if it has them."""

    __slots__ = ("header", "mm", "slot_size", "tickets", "view")

    def __init__(self, mm: mmap.mmap, slot_size: int, header: int) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.slot_size = slot_size
        self.header = header  # ticket words (8 bytes a slot) before the first slot
        self.tickets = self.view[:header] if header else None

    def close(self) -> None:
        if self.tickets is not None:
            self.tickets.release()
        self.view.release()
        with contextlib.suppress(BufferError):  # a user still holds a slice: GC unmaps it
            self.mm.close()


def _ignore_unasked(reply: p.Message, fds: list[int]) -> None:
    close_fds(fds)


def _nothing() -> None:
    pass


def _ignore_welcome(welcome: p.Welcome) -> None:
    pass


class Connection:
    """The socket to one manager and what lives and dies with it (see the module's doc)."""

    __slots__ = (
        "address", "broken", "claims", "classes", "client_id", "closed", "hung_up", "instance",
        "lends", "lock", "manager_pid", "messages", "name", "notices", "on_forked", "on_lost",
        "on_notice", "on_reconnected", "on_unasked", "pid", "prefetching", "reconnect",
        "reopen_failed", "req", "segments", "sock", "tickets_on", "timeout", "token",
        "transit_timeout",
    )  # fmt: skip

    def __init__(
        self, address: str, name: str, timeout: float, lends: bool, reconnect: float = 0.0
    ) -> None:
        self.address = address
        self.reconnect = reconnect  # seconds to try reaching a restarted manager (0: never)
        self.hung_up = False  # broken because the manager hung up: a restart may follow
        self.reopen_failed = False  # the last reopen() found no manager: try once, not for long
        self.manager_pid = 0
        self.lends = lends  # this process lends slots by their words (the C extension)
        self.name = name
        self.timeout = timeout
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = -1
        self.req = 0
        self.closed = False
        self.broken: ManagerGoneError | None = None
        self.client_id = -1
        self.instance = 0
        self.classes = (0, 0)  # (min_size, max_size) of the first Welcome
        self.tickets_on = False
        self.token: Callable[[int, int, int], int] = _no_token
        self.transit_timeout = 30.0  # from the Welcome: how long a handle waits for its attach
        self.segments: dict[int, _Segment] = {}
        self.notices: list[int] = []  # unsent handoff notices, oldest first (Notices.flat)
        self.claims: set[tuple[int, int]] = set()  # slots claimed in those notices
        # req of each prefetch Acquire not answered yet -> its class index
        self.prefetching: dict[int, int] = {}
        # Requests sent, usage reports aside (see Pool._reset_counters).
        self.messages = 0
        self.on_unasked: Unasked = _ignore_unasked
        self.on_lost: Callable[[], None] = _nothing
        self.on_notice: Callable[[], None] = _nothing
        self.on_forked: Callable[[], None] = self.forget_parent  # its owner's, which calls this
        self.on_reconnected: Callable[[p.Welcome], None] = _ignore_welcome

    # ------------------------------------------------------------ state

    def live(self) -> bool:
        """True if this process's connection is usable for returning slots."""
        return not self.closed and self.broken is None and self.pid == os.getpid()

    def next_req(self) -> int:
        self.req += 1
        return self.req

    # ---------------------------------------------------------- opening

    def open(self) -> p.Welcome:
        """Connect and say hello; the first ``Welcome`` fixes the size classes."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # A blocking socket with kernel timeouts: Python's own settimeout() would
        # poll() before every send and recv, a syscall per call on the slow path.
        seconds = max(1e-3, self.timeout)
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(self.address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ManagerGoneError(
                f"no shmpool manager listens at {self.address} ({exc.strerror}); start one "
                "with `shmpool serve` or shmpool.start(), or set SHMPOOL_ADDRESS"
            ) from None
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.pid = os.getpid()
        self.broken = None
        self.hung_up = False
        hello = p.Hello(self.next_req(), p.VERSION, self.pid, self.name, int(self.lends))
        reply, fds = self.call(hello)
        close_fds(fds)
        if not isinstance(reply, p.Welcome):
            raise self.gone(ProtocolError(f"expected Welcome, got {type(reply).__name__}"))
        if self.classes == (0, 0):
            self.classes = (reply.min_size, reply.max_size)
        elif self.classes != (reply.min_size, reply.max_size):
            raise self.gone(ProtocolError("the manager's size classes changed"))
        self.instance = reply.instance  # a new run after a restart (reopen)
        self.manager_pid = reply.manager_pid
        self.client_id = reply.client_id
        self.tickets_on = bool(reply.tickets) and self.lends
        self.token = p.token_maker(reply.key)
        self.transit_timeout = reply.transit_ms / 1000
        return reply

    def ensure(self) -> socket.socket:
        """This process's live socket: opened anew after a fork.

        Raises:
            PoolClosedError, ManagerGoneError: closed, or the manager was lost.
        """
        if self.closed:
            raise PoolClosedError("this pool was closed; connect again")
        if self.pid != os.getpid():
            self.on_forked()  # a process forked without the at-fork hooks
        if self.broken is not None:
            if not self.can_reopen():
                raise ManagerGoneError(str(self.broken))
            self.reopen()
        if self.sock is None:
            self.open()
        assert self.sock is not None
        return self.sock

    def can_reopen(self) -> bool:
        """Whether ``ensure`` would try to reach a restarted manager (see the module's doc)."""
        return self.hung_up and self.reconnect > 0 and not self.closed

    def reopen(self) -> None:
        """Connect to the manager that now listens at the address (the old one hung up).

        Tries for ``reconnect`` seconds, pausing longer each time (once only
        if the last reopen found nobody: each call should not wait that long
        again). What belonged to the old manager is dropped first.

        Raises:
            ManagerGoneError: no manager answered in time (the next call tries
                again), or the one there is the same run, has other size
                classes, or refused this process (no more tries then).
            AccessDeniedError: the new manager refused this process.
        """
        lost = str(self.broken)
        self.forget_manager()
        old = self.instance
        deadline = time.monotonic() + (0.0 if self.reopen_failed else self.reconnect)
        pause = RECONNECT_FIRST_PAUSE
        while True:
            try:
                welcome = self.open()
                break
            except AccessDeniedError:
                self.hung_up = False  # refused: no use trying again
                raise
            except ManagerGoneError as exc:
                if not self.hung_up or time.monotonic() + pause > deadline:
                    self.reopen_failed = self.hung_up
                    raise self._not_reopened(lost, exc) from None
            time.sleep(pause)
            pause = min(2 * pause, RECONNECT_MAX_PAUSE)
        if welcome.instance == old:  # the same run closed this connection: it meant to
            self.hung_up = False
            raise self.gone(ManagerGoneError(lost))
        self.reopen_failed = False
        self.on_reconnected(welcome)

    def _not_reopened(self, lost: str, cause: ManagerGoneError) -> ManagerGoneError:
        """The error of a ``reopen`` that found no manager to go on with (``broken`` then)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.hung_up:
            err = ManagerGoneError(
                f"{lost}; no manager answered at {self.address} since ({cause}); "
                "the next call tries again"
            )
            self.broken = ManagerGoneError(lost)  # what the next try's error starts with
        else:  # other size classes, or not a manager: no more tries
            err = ManagerGoneError(f"{lost}; the manager now at {self.address}: {cause}")
            self.broken = ManagerGoneError(str(err))
        return err

    def forget_manager(self) -> None:
        """Drop what belonged to a manager that hung up: mappings, notices, prefetches.

        A mapping that a lease (or a slice of one) still uses stays until
        that is gone; nothing of it is reachable through this connection.
        """
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for segment in list(self.segments):
            self.unmap(segment)
        self.notices, self.claims = [], set()  # the new manager never lent or gave these
        self.prefetching = {}
        self.client_id = -1
        self.tickets_on = False
        self.token = _no_token

    def forget_parent(self) -> None:
        """In a forked child: drop the parent's socket, notices and mappings.

        Closing our copy of the socket's descriptor leaves the parent's
        connection open (no shutdown), and lets the manager see the parent's
        end-of-file promptly when the parent dies. The parent's mappings go
        too: this connection was never sent those segments, so it must not
        claim slots in them by their words (the manager would not know it
        holds them); an attach maps them anew. Leases inherited from the
        parent keep their memory through their views.
        """
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.pid = os.getpid()
        self.req = 0
        self.client_id = -1  # until this process has its own connection
        self.lock = threading.Lock()
        self.broken = None
        self.hung_up = self.reopen_failed = False
        self.notices, self.claims = [], set()  # the parent sends its own
        self.prefetching = {}
        self.segments = {}
        self.messages = 0

    def close(self) -> None:
        """Close the socket (this process's only) and unmap every segment."""
        self.closed = True
        if self.sock is not None and self.pid == os.getpid():
            self.sock.close()
        self.sock = None
        self.prefetching = {}
        for segment in list(self.segments):
            self.unmap(segment)  # a mapping a lease still exports stays until GC

    # ---------------------------------------------------------- segments

    def map(self, segments: tuple[p.SegmentInfo, ...], fds: list[int]) -> None:
        """Map the segments a reply carried (one descriptor each; all are closed)."""
        if len(fds) != len(segments):
            close_fds(fds)
            raise self.gone(ProtocolError(f"{len(segments)} segments came with {len(fds)} fds"))
        for i, (info, fd) in enumerate(zip(segments, fds, strict=True)):
            try:
                mm = map_segment(fd, info.size)
            except (OSError, ValueError) as exc:
                close_fds(fds[i:])
                raise self.gone(
                    ProtocolError(f"cannot map segment {info.segment}: {exc}")
                ) from None
            os.close(fd)
            self.unmap(info.segment)
            self.segments[info.segment] = _Segment(mm, info.slot_size, info.header)

    def unmap(self, segment: int) -> None:
        seg = self.segments.pop(segment, None)
        if seg is not None:
            seg.close()

    # -------------------------------------------------------------- wire

    def send(self, data: bytes, hello: bool = False, counted: bool = True) -> socket.socket:
        """Send a request; ``counted``: in ``messages`` (usage reports are not)."""
        sock = self.sock if hello else self.ensure()
        assert sock is not None
        if self.notices and not hello:
            self.flush_notices()  # they come before anything this client says next
        return self.send_on(sock, data, counted)

    def send_on(self, sock: socket.socket, data: bytes, counted: bool = True) -> socket.socket:
        try:
            sock.send(data)
        except BlockingIOError:
            raise self.gone(
                ManagerGoneError(f"the manager did not take a request within {self.timeout} s")
            ) from None
        except OSError as exc:
            raise self.gone(exc, hung_up=True) from None
        if counted:
            self.messages += 1
        return sock

    def note(self, kind: int, ref: p.SlotRef, token: int, urgent: bool = False) -> None:
        """Queue a handoff notice; send the queue when it is full.

        The ticket word already says who holds the slot, so the manager's
        books can wait. Two exceptions send the queue at once: an ``urgent``
        notice, one that the ticket word does not back (no C extension, or a
        segment without words), is the only record of its handoff; and
        handing on a slot whose claim is still queued must put that claim on
        the wire before the slot can be claimed again (if this process died
        holding both, nothing would tell the manager who had the slot in
        between).
        """
        notices = self.notices
        notices += (kind, *ref, token)
        if kind == p.NOTICE_CLAIMED:
            self.claims.add(ref[:2])
        elif urgent or ref[:2] in self.claims:
            self.flush_notices()
            return
        queued = len(notices)
        if queued == p.NOTICE_WORDS:
            self.on_notice()  # the janitor sends them within JANITOR_PERIOD
        elif queued >= NOTICE_BATCH * p.NOTICE_WORDS:
            self.flush_notices()

    def flush_notices(self) -> None:
        """Send the queued handoff notices in one message."""
        notices, self.notices = self.notices, []
        self.claims.clear()
        if notices and self.sock is not None and self.pid == os.getpid():
            self.send_on(self.sock, p.encode_notices(self.next_req(), notices))

    def call(self, request: p.Message) -> tuple[p.Message, list[int]]:
        """Send a request object and return its reply."""
        return self.roundtrip(request.req, p.encode(request), isinstance(request, p.Hello))

    def roundtrip(
        self, req: int, data: bytes, hello: bool = False, deadline: float | None = None
    ) -> tuple[p.Message, list[int]]:
        """Send one encoded request and return its reply.

        ``deadline`` (monotonic): wait for the reply until then, rather than
        ``timeout``; the manager holds an acquire that waits for memory.
        Messages that come first go to ``on_unasked``. An error reply is
        raised; one that means this client is refused breaks the connection.
        """
        sock = self.send(data, hello)
        while True:
            reply, fds = self.receive(sock, deadline)
            if reply.req != req or isinstance(reply, p.Recall):
                self.on_unasked(reply, fds)  # a Recall, or a prefetch answered first
                continue
            if isinstance(reply, p.Error):
                close_fds(fds)
                err = error_from_code(reply.code, reply.message)
                if isinstance(err, (AccessDeniedError, ProtocolError)):
                    raise self.gone(err)
                raise err
            return reply, fds

    def await_reply(self, req: int) -> None:
        """Read the manager's messages until prefetch ``req`` is answered (by ``on_unasked``)."""
        while req in self.prefetching:
            sock = self.sock
            if sock is None:
                return
            reply, fds = self.receive(sock)
            self.on_unasked(reply, fds)

    def poll(self) -> None:
        """Hand whatever the manager sent unasked to ``on_unasked``, without waiting."""
        sock = self.sock
        while sock is not None and self.live() and readable(sock):
            reply, fds = self.receive(sock)
            self.on_unasked(reply, fds)
            sock = self.sock

    def receive(
        self, sock: socket.socket, deadline: float | None = None
    ) -> tuple[p.Message, list[int]]:
        """The next message on ``sock``, with the descriptors it carried."""
        while True:
            try:
                data, ancdata, flags, _ = sock.recvmsg(p.MAX_REPLY + 1, _ANCBUF)
                break
            except (TimeoutError, BlockingIOError):
                if deadline is not None and time.monotonic() < deadline:
                    continue  # a long wait for memory: the manager answers when it ends
                raise self.gone(
                    ManagerGoneError(f"the manager did not answer within {self.timeout} s")
                ) from None
            except OSError as exc:
                raise self.gone(exc, hung_up=True) from None
        fds = _fds_from(ancdata)
        if not data:
            close_fds(fds)
            raise self.gone(
                ManagerGoneError(f"the manager at {self.address} closed the connection"),
                hung_up=True,
            )
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise self.gone(ProtocolError("the manager sent an oversized message"))
        try:
            return p.decode(data), fds
        except ProtocolError as exc:
            close_fds(fds)
            raise self.gone(exc) from None

    def gone(self, cause: BaseException, hung_up: bool = False) -> ShmpoolError:
        """Mark the connection dead (``on_lost`` is told); return the error to raise.

        ``hung_up``: the manager ended the connection (it exited, was killed,
        or closed it); the next call may reach a restarted one (``reopen``).
        """
        self.hung_up = hung_up
        if isinstance(cause, ShmpoolError) and not isinstance(cause, ProtocolError):
            err: ShmpoolError = cause
        else:
            detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
            err = ManagerGoneError(f"lost the manager at {self.address}: {detail}")
        self.broken = ManagerGoneError(str(err))  # a fresh one: no traceback, no cycle
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.prefetching = {}  # the answers still to come died with the socket
        self.on_lost()  # cached slots died with the connection
        return err


def _no_token(segment: int, index: int, generation: int) -> int:
    raise ManagerGoneError("not connected to a manager yet")


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(memoryview(data)[:usable].cast("i"))
    return fds


def close_fds(fds: list[int]) -> None:
    """Close descriptors that came with a message, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has a message (or end-of-file) to read now.

    ``poll``, not ``select``: select refuses descriptors from 1024 on, which
    is what a process with many files open gets for its sockets. A new poll
    object each call costs about 2 µs (select as much), once a tick of 50 ms.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
