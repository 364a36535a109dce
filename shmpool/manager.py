"""The manager: one process, one selector loop, the arena behind it.

The loop is the gunicorn arbiter's shape: signal handlers only set a flag and
write a byte to a wake-up pipe; every turn of the loop runs named steps
(accept, read requests, flush replies, timers); stopping always ends, because
it only closes sockets and descriptors, never waits on a client.

One client can only hurt itself: its bytes are decoded with bounded sizes, a
malformed frame gets an error reply and a closed connection, and any
unexpected failure while serving it closes that connection alone.

A slot leased to a live process is never given to anyone else. So a client
is never dropped for being slow: one that leaves replies unread is simply
not read from (backpressure) until it catches up, and it gets at most one
unread ``Recall`` per class. When the process behind a connection exits
(its pidfd, which also sees through a forked child that kept the socket) or
hangs up, the arena returns all its slots. When the manager itself closes a
connection whose process still runs (it broke the protocol), the slots stay
*quarantined*, held by nobody, until that process exits: it may still be
writing them.

Memory moves (see ``arena``): an acquire that finds the budget spent takes
the pages of other classes' free slots at once; if that is not enough, it
waits while every client is asked to return the idle slots it caches
(``Recall`` of every class). Every ``idle_release / 2`` seconds the free slots
nobody took for ``idle_release`` seconds give their pages back to the OS, and
clients that sent nothing for that long are asked for their caches.

Limits, each with a clear error to the one refused: connections in all and
per user, a handshake deadline, replies queued for all clients together,
a per-client memory quota, and Stats replies built at most a tenth of the
loop's time (a client asking more often waits, alone).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import secrets
import select
import selectors
import signal
import socket
import stat
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import buffer as _buffer
from . import protocol as p
from .address import resolve
from .arena import DEFAULT_SEGMENT_BYTES, Arena, Backing
from .errors import (
    PoolExhaustedError,
    ProtocolError,
    QuotaExceededError,
    ShmpoolError,
    StaleHandleError,
    TooManyClientsError,
)
from .leasereport import LeaseReports
from .segment import ShmSegment, sweep_orphans
from .sizeclass import Classes, format_size, parse_size

__all__ = ["Manager"]

log = logging.getLogger("shmpool")
_speedups: Any = vars(_buffer)["_speedups"]

_CRED = struct.Struct("3i")
_INT = struct.Struct("i")
#: Bytes of replies one client may leave unread before the manager stops
#: reading its requests (it is throttled, never dropped for being slow).
PEER_QUEUE_BYTES = 1 << 20
#: Default cap on the reply bytes all clients leave unread together; past it,
#: each client whose queue grows is throttled too.
MAX_QUEUED_BYTES = 64 << 20
#: Default seconds a new connection has to send its Hello.
HELLO_TIMEOUT = 5.0
#: Default cap on connections, in all (and per user unless set apart).
MAX_CLIENTS = 4096
#: A Stats reply costs the loop at most 1 / (1 + STATS_DUTY) of its time.
STATS_DUTY = 9
#: Requests read from a client whose process exited, before it is dropped.
MAX_DRAIN = 4096
#: Requests served from one client per loop turn, so none can starve the rest.
MAX_READS_PER_TURN = 64
MAX_LISTED_CLIENTS = 1000
#: Refused peers linger this long (or until they speak) to read why.
REFUSE_LINGER = 1.0
MAX_REFUSED = 64
#: How long an Attach that overtook the notices it depends on waits for them.
ATTACH_WAIT = 1.0
#: Connection ids run 1..MAX_CLIENT_ID, then start again (skipping live ones).
MAX_CLIENT_ID = 0xFFFF_FFFF
#: Default seconds a free slot keeps its pages unused before they go back to the OS.
IDLE_RELEASE = 30.0
#: ``Recall.slot_size`` asking for the idle slots of every class.
EVERY_CLASS = 0
#: While an acquire waits, its recalls go out again this often (slots cached
#: since the last one serve it too; each client has at most one unread).
RECALL_EVERY = 0.1


class _Peer:
    __slots__ = (
        "events", "heard", "id", "name", "outbytes", "outq", "parked", "paused", "pid", "pidfd",
        "quiet", "recalled", "sock", "stats_wait", "throttled", "uid", "welcomed",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, peer_id: int, pid: int, uid: int) -> None:
        self.sock = sock
        self.id = peer_id
        self.pid = pid
        self.uid = uid
        self.pidfd = -1  # readable when the process exits; -1 if it cannot be watched
        self.name = ""
        self.welcomed = False
        self.parked = False  # an Acquire of this peer waits for recalled slots
        # Not read from while any of these holds:
        self.paused = False  # a notice of it waits for other clients' notices
        self.throttled = False  # it leaves too many replies unread
        self.stats_wait = False  # its Stats request waits for the next build
        self.events = 0  # what the selector watches on its socket
        self.outq: deque[tuple[bytes, Sequence[int]]] = deque()
        self.outbytes = 0
        self.recalled: set[int] = set()  # slot sizes recalled from it (maybe unread)
        self.heard = -1  # its message count at the last idle pass
        self.quiet = 0  # idle passes in a row it sent nothing

    @property
    def reading(self) -> bool:
        return not (self.paused or self.throttled or self.stats_wait)


class _Waiter:
    __slots__ = ("deadline", "msg", "next_recall", "peer", "recalled", "slot_size", "why")

    def __init__(
        self,
        peer: _Peer,
        msg: p.Acquire,
        slot_size: int | None,  # None: an oversize buffer
        deadline: float,
        recalled: set[int],
    ) -> None:
        self.peer = peer
        self.msg = msg
        self.slot_size = slot_size
        self.deadline = deadline
        self.recalled = recalled  # connections asked to return slots for it
        self.next_recall = 0.0
        self.why = ""  # the last reason it could not be served


class Manager:
    """A shmpool manager serving one Unix socket.

    ``serve()`` runs the loop in the calling thread until ``stop()`` is called,
    SIGINT/SIGTERM arrives (when serving on the main thread), or the
    ``lifeline_fd`` reaches end-of-file (the embedding parent died).

    ``acquire_wait`` bounds how long an acquire that finds its class empty
    and the budget spent may wait while idle slots cached by other clients
    are recalled; after it, the acquire fails with ``PoolExhaustedError``.
    ``allow_uids`` names users besides our own that may connect (the socket
    is then made connectable by all; access is checked with SO_PEERCRED).

    Limits: ``max_clients`` connections in all and ``max_clients_per_uid``
    per user (default: the same); a connection must say Hello within
    ``hello_timeout`` seconds; ``max_queued_bytes`` of replies may wait
    unread for all clients together; ``client_quota`` (bytes, None: no
    quota) caps the memory one connection may hold.

    ``idle_release``: seconds a free slot may sit unused before its pages go
    back to the OS (0: never; they still move to any class that needs them).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        min_size: int | str = "4KiB",
        max_size: int | str = "64MiB",
        memory: int | str = "1GiB",
        allow_uids: Sequence[int] | None = None,
        segment_bytes: int | str = DEFAULT_SEGMENT_BYTES,
        allocate: Callable[[int], Backing] = ShmSegment,
        acquire_wait: float = 2.0,
        transit_timeout: float = 30.0,
        tickets: bool = True,
        max_clients: int = MAX_CLIENTS,
        max_clients_per_uid: int | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
        max_queued_bytes: int | str = MAX_QUEUED_BYTES,
        client_quota: int | str | None = None,
        idle_release: float = IDLE_RELEASE,
    ) -> None:
        if not 0 <= idle_release < float("inf"):
            raise ValueError("idle_release must be a finite number of seconds, at least 0")
        if max_clients < 1 or (max_clients_per_uid is not None and max_clients_per_uid < 1):
            raise ValueError("max_clients and max_clients_per_uid must be at least 1")
        if not hello_timeout > 0:
            raise ValueError("hello_timeout must be positive")
        self.address = resolve(address)
        self.classes = Classes(min_size, max_size)
        self.memory = parse_size(memory, name="memory")
        # Ticket words need atomics (the C extension) and our own segments.
        ops = _speedups if tickets and allocate is ShmSegment else None
        self.arena = Arena(
            self.classes,
            self.memory,
            allocate,
            segment_bytes=parse_size(segment_bytes, name="segment_bytes"),
            tickets=ops,
        )
        self.tickets = ops is not None
        self.allow_uids = frozenset((os.getuid(), *(allow_uids or ())))
        self.acquire_wait = acquire_wait
        self.transit_timeout = transit_timeout
        self.max_clients = max_clients
        self.max_clients_per_uid = max_clients_per_uid or max_clients
        self.hello_timeout = hello_timeout
        self.max_queued_bytes = parse_size(max_queued_bytes, name="max_queued_bytes")
        self.client_quota = (
            None if client_quota is None else parse_size(client_quota, name="client_quota")
        )
        self.idle_release = float(idle_release)
        self._idle_due = time.monotonic() + self.idle_release / 2
        self.instance = secrets.randbits(63)
        self._waiting: deque[_Waiter] = deque()
        self._attaching: list[tuple[_Peer, p.Attach, float]] = []
        # notices that wait for other clients' notices (their sender is paused)
        self._claiming: list[tuple[_Peer, tuple[int, ...], float]] = []
        self.pid = os.getpid()
        self._peers: dict[int, _Peer] = {}
        self._by_fd: dict[int, _Peer] = {}
        self._per_uid: dict[int, int] = {}
        self._by_pidfd: dict[int, _Peer] = {}
        self._outbytes = 0  # reply bytes queued for all peers
        self._hellos: deque[tuple[float, _Peer]] = deque()  # handshake deadlines, in order
        # pidfd -> connection id, for connections closed while their process runs
        self._quarantined: dict[int, int] = {}
        self._stats_waiting: list[tuple[_Peer, int]] = []
        self._lease_reports = LeaseReports()  # tracking clients' long-held leases
        self._stats_leases: dict[tuple[int, int], int] = {}  # (peer, req) -> Stats.leases
        self._stats_due = 0.0  # no Stats reply is built before this
        self._refused: dict[int, tuple[socket.socket, float]] = {}
        self._next_id = 1
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._listener_ino: tuple[int, int] | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._spare_fd = -1
        self._stopping = False
        self._started = time.monotonic()

    # --------------------------------------------------------------- running

    def serve(self, *, ready_fd: int | None = None, lifeline_fd: int | None = None) -> None:
        """Listen and serve until stopped; always tears down what it built."""
        try:
            self._open()
        except BaseException as exc:
            _notify(ready_fd, f"error: {exc}\n")
            self._teardown()
            raise
        old = self._install_signals()
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        if lifeline_fd is not None:
            self._sel.register(lifeline_fd, selectors.EVENT_READ, self._on_lifeline)
        log.info(
            "manager %d listening on %s (%s..%s, memory %s)",
            self.pid,
            self.address,
            format_size(self.classes.min_size),
            format_size(self.classes.max_size),
            format_size(self.memory),
        )
        _notify(ready_fd, "ok\n")
        try:
            while not self._stopping:
                self._turn()
        finally:
            self._restore_signals(old)
            self._teardown()
            log.info("manager %d stopped", self.pid)

    def _turn(self) -> None:
        """One turn of the loop: events, then the timed steps.

        A failure in one client's event closes that client alone; a failure
        in a timed step is logged and the loop goes on.
        """
        for key, events in self._sel.select(timeout=self._next_timeout()):
            if not self._current(key):
                continue  # closed by an earlier event of this turn (its fd may be reused)
            try:
                key.data(key, events)
            except Exception:
                self._event_failed(key)
        for step in (
            self._expire_waiting,
            self._expire_refused,
            self._expire_hellos,
            self._expire_transit,
            self._serve_stats,
            self._serve_attaching,
            self._release_idle,
        ):
            try:
                step()
            except Exception:
                log.exception("internal error in %s; going on", step.__name__)

    def _current(self, key: selectors.SelectorKey) -> bool:
        """Whether ``key`` is still registered as it was (for this very object, not its fd)."""
        now = self._sel.get_map().get(key.fd)
        return now is not None and now.fileobj is key.fileobj and now.data == key.data

    def _event_failed(self, key: selectors.SelectorKey) -> None:
        peer = self._by_fd.get(key.fd)
        if peer is None:
            log.exception("internal error handling an event; going on")
            return
        log.exception("internal error serving client %d (pid %d)", peer.id, peer.pid)
        self._drop(peer, "internal error", gone=False)

    def stop(self) -> None:
        """Ask the loop to end (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---------------------------------------------------------- setting up

    def _open(self) -> None:
        _raise_fd_limit()
        for name in sweep_orphans():
            log.warning("removed /dev/shm/%s left by a dead manager", name)
        self._claim_address()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.address)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.address, 0o666 if len(self.allow_uids) > 1 else 0o600)
        st = os.stat(self.address)
        self._listener_ino = (st.st_dev, st.st_ino)
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._sel.register(sock, selectors.EVENT_READ, self._on_accept)

    def _claim_address(self) -> None:
        """Refuse a live manager's address; clear a dead one's stale socket file."""
        try:
            st = os.lstat(self.address)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.address} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.address)
        except OSError:
            os.unlink(self.address)  # nobody listens: a stale file from a killed manager
            return
        finally:
            probe.close()
        raise FileExistsError(f"a manager is already listening on {self.address}")

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda *_: self.stop())
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def _teardown(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer, "manager stopping")
        for pidfd in list(self._quarantined):
            self._release_quarantine(pidfd)
        for fd in list(self._refused):
            self._close_refused(fd)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_address()
        self.arena.close()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w, self._spare_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _unlink_address(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.address)
            if (st.st_dev, st.st_ino) == self._listener_ino:
                os.unlink(self.address)

    # ------------------------------------------------------------- events

    def _on_wake(self, key: selectors.SelectorKey, events: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def _on_lifeline(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            data = os.read(key.fd, 64)
        except OSError:
            data = b""
        if not data:
            log.info("manager %d: the embedding process is gone; stopping", self.pid)
            self.stop()

    def _on_accept(self, key: selectors.SelectorKey, events: int) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_one(exc)
                    return
                raise
            self._admit(sock)

    def _refuse_one(self, exc: OSError) -> None:
        """Out of descriptors: accept and close one client so the loop cannot spin."""
        log.error("cannot accept a client: %s", exc.strerror)
        assert self._listener is not None
        if self._spare_fd < 0:
            return
        os.close(self._spare_fd)
        with contextlib.suppress(OSError):
            self._listener.accept()[0].close()
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _admit(self, sock: socket.socket) -> None:
        pid, uid, _gid = _CRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        )
        sock.setblocking(False)
        if uid not in self.allow_uids:
            log.warning("refused a client with uid %d (pid %d)", uid, pid)
            self._refuse(sock, f"uid {uid} may not use this manager")
            return
        too_many = self._too_many(uid)
        if too_many:
            log.warning("refused a client of uid %d (pid %d): %s", uid, pid, too_many)
            self._refuse(sock, too_many, TooManyClientsError.code)
            return
        peer = _Peer(sock, self._next_id, pid, uid)
        while True:  # ids fit 32 bits (ticket words hold them) and are never shared
            self._next_id = self._next_id % MAX_CLIENT_ID + 1
            if self._next_id not in self._peers and self._next_id not in self._quarantined_ids():
                break
        self._peers[peer.id] = peer
        self._by_fd[sock.fileno()] = peer
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._watch(peer)
        self._hellos.append((time.monotonic() + self.hello_timeout, peer))
        peer.pidfd = _pidfd(pid)
        if peer.pidfd >= 0:  # its own callback, so that a stale event never hits a successor
            self._by_pidfd[peer.pidfd] = peer
            self._sel.register(peer.pidfd, selectors.EVENT_READ, functools.partial(self._on_exit))

    def _too_many(self, uid: int) -> str:
        """Why one more connection of ``uid`` is refused, or "" if it is not."""
        if len(self._peers) >= self.max_clients:
            return (
                f"the manager serves {len(self._peers)} connections, its limit "
                "(raise it with --max-clients)"
            )
        if self._per_uid.get(uid, 0) >= self.max_clients_per_uid:
            return (
                f"uid {uid} has {self._per_uid[uid]} connections, the limit per user "
                "(raise it with --max-clients-per-uid)"
            )
        return ""

    def _quarantined_ids(self) -> Iterable[int]:
        return self._quarantined.values() if self._quarantined else ()

    def _refuse(self, sock: socket.socket, why: str, code: str = "denied") -> None:
        """Tell a refused peer why, and linger until it has read it.

        Closing at once would make the peer's Hello fail with EPIPE before it
        reads the refusal; so the socket stays open until the peer speaks or
        hangs up, or ``REFUSE_LINGER`` passes. At most ``MAX_REFUSED`` linger.
        """
        try:
            sock.send(p.encode(p.Error(0, code, why[: p.MAX_TEXT])))
        except OSError:
            sock.close()
            return
        while len(self._refused) >= MAX_REFUSED:
            self._close_refused(next(iter(self._refused)))
        self._refused[sock.fileno()] = (sock, time.monotonic() + REFUSE_LINGER)
        self._sel.register(sock, selectors.EVENT_READ, self._on_refused)

    def _on_refused(self, key: selectors.SelectorKey, events: int) -> None:
        # Read what the peer sent first: closing a Unix socket with unread data
        # resets the peer, which could then lose the refusal it has not read.
        sock, _ = self._refused[key.fd]
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not sock.recv(p.MAX_REQUEST + 1):
                    break
        self._close_refused(key.fd)

    def _close_refused(self, fd: int) -> None:
        sock, _ = self._refused.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()

    def _expire_refused(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, (_, deadline) in self._refused.items() if deadline <= now]:
            self._close_refused(fd)

    def _on_peer(self, key: selectors.SelectorKey, events: int) -> None:
        peer = self._by_fd.get(key.fd)
        if peer is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(peer)
        if events & selectors.EVENT_READ and peer.reading and peer.id in self._peers:
            self._read(peer)

    def _read(self, peer: _Peer, most: int = MAX_READS_PER_TURN) -> None:
        for _ in range(most):
            try:
                data = peer.sock.recv(p.MAX_REQUEST + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(peer, f"receive failed: {exc.strerror}")
                return
            if not data:
                self._drop(peer, "disconnected")
                return
            if not self._handle(peer, data):
                return

    def _on_exit(self, key: selectors.SelectorKey, events: int) -> None:
        """The process behind a connection exited: serve what it sent, then drop it.

        A forked child may still hold the socket (so no end-of-file comes),
        but it never uses its parent's connection or slots.
        """
        peer = self._by_pidfd.pop(key.fd, None)
        if peer is None:  # a quarantined connection's process
            if key.fd in self._quarantined:
                self._release_quarantine(key.fd)
            return
        if peer.reading:
            self._read(peer, MAX_DRAIN)
        self._drop(peer, "its process exited")

    # ----------------------------------------------------------- requests

    def _handle(self, peer: _Peer, data: bytes) -> bool:
        """Serve one request; returns False if the peer was dropped."""
        req = 0
        try:
            msg = p.decode(data, max_size=p.MAX_REQUEST)
            req = msg.req
            if not isinstance(msg, p.REQUESTS):
                raise ProtocolError(f"{type(msg).__name__} is not a request")
            if peer.welcomed == isinstance(msg, p.Hello):
                raise ProtocolError("Hello must come first, and once")
            if peer.parked and not isinstance(msg, p.NO_REPLY):
                raise ProtocolError("a request was sent while an Acquire still waits")
            self._dispatch(peer, msg)
        except ProtocolError as exc:
            log.warning("client %d (pid %d) broke the protocol: %s", peer.id, peer.pid, exc)
            self._send(peer, p.encode(p.Error(req, exc.code, str(exc)[: p.MAX_TEXT])))
            self._drop(peer, "protocol error", gone=False)
            return False
        except ShmpoolError as exc:
            self._send(peer, p.encode(p.Error(req, exc.code, str(exc)[: p.MAX_TEXT])))
        except Exception:
            log.exception("internal error serving client %d (pid %d)", peer.id, peer.pid)
            self._send(peer, p.encode(p.Error(req, "error", "internal manager error; see its log")))
            self._drop(peer, "internal error", gone=False)
            return False
        return peer.id in self._peers and peer.reading

    def _dispatch(self, peer: _Peer, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            self._hello(peer, msg)
            return
        arena = self.arena
        if isinstance(msg, p.Acquire):
            arena.note_message(peer.id, msg.hits)
            self._acquire(peer, msg)
        elif isinstance(msg, p.Release):
            arena.note_message(peer.id, msg.hits)
            arena.release(peer.id, msg.slots)
            self._send(peer, p.encode(p.Ok(msg.req)))
            self._serve_waiting()
        elif isinstance(msg, p.Return):
            arena.note_message(peer.id, msg.hits)
            try:
                arena.release(peer.id, msg.slots)
            except ShmpoolError as exc:  # a correct client never returns what it lacks
                raise ProtocolError(f"bad Return: {exc}") from None
            self._serve_waiting()
        elif isinstance(msg, p.Notices):
            arena.note_message(peer.id)
            rest = self._apply_notices(peer, msg.flat)
            if self._waiting:
                self._recall_late(peer)
            if rest:
                self._pause(peer)  # its later messages may depend on the notice that waits
                self._claiming.append((peer, rest, time.monotonic() + self.transit_timeout))
            if self._attaching or self._claiming:
                self._serve_attaching()
        elif isinstance(msg, p.Share):
            arena.note_message(peer.id)
            deadline = time.monotonic() + self.transit_timeout
            try:
                arena.share(peer.id, msg.slot, msg.token, msg.readers, deadline)
            except ShmpoolError as exc:  # a correct client only shares what it holds
                raise ProtocolError(f"bad Share: {exc}") from None
            if self._attaching:
                self._serve_attaching()
        elif isinstance(msg, p.Attach):
            arena.note_message(peer.id)
            try:
                self._attach(peer, msg)
            except StaleHandleError:
                if not arena.awaits_detach(msg.slot, shared=msg.readers > 0):
                    raise
                peer.parked = True  # the sender's notice is still on the way: wait for it
                self._attaching.append((peer, msg, time.monotonic() + ATTACH_WAIT))
        elif isinstance(msg, p.Stats):
            arena.note_message(peer.id)
            if msg.leases != p.NO_LEASES:
                self._stats_leases[peer.id, msg.req] = msg.leases
            self._stats_request(peer, msg.req)
        elif isinstance(msg, p.Leases):  # bookkeeping, like Usage: not counted in messages
            self._lease_reports.note(peer.id, msg)
        elif isinstance(msg, p.Usage):  # bookkeeping, not a request: not counted in messages
            arena.note_usage(peer.id, msg.requested, msg.sizes)

    def _acquire(self, peer: _Peer, msg: p.Acquire) -> None:
        if not msg.wait:  # a prefetch or timeout=0: never before those who wait, never parked
            slot_size = self.arena.class_size(msg.size)
            if any(w.slot_size == slot_size for w in self._waiting):
                raise PoolExhaustedError(f"other clients wait for {slot_size}-byte slots")
            self._grant(peer, msg)
            return
        try:
            self._grant(peer, msg)
        except QuotaExceededError:
            raise  # only its own releases can help: no waiting
        except PoolExhaustedError as exc:
            if not self._park(peer, msg, str(exc)):
                raise

    def _grant(self, peer: _Peer, msg: p.Acquire) -> None:
        count = msg.count if self.client_quota is None else self._within_quota(peer, msg)
        g = self.arena.acquire(peer.id, msg.size, count)
        self._send(peer, p.encode_grant(msg.req, g.slot_size, g.slots, g.segments), g.fds)

    def _within_quota(self, peer: _Peer, msg: p.Acquire) -> int:
        """How many of ``msg.count`` slots ``peer`` may still hold under the client quota.

        Raises:
            QuotaExceededError: not even one.
        """
        assert self.client_quota is not None
        slot = self.arena.class_size(msg.size) or msg.size
        held = self.arena.held_bytes(peer.id)
        room = (self.client_quota - held) // slot
        if room < 1:
            raise QuotaExceededError(
                f"this client holds {format_size(held)}; {format_size(slot)} more would pass "
                f"the manager's per-client quota of {format_size(self.client_quota)} "
                "(release leases, trim() the cache, or raise --client-quota)"
            )
        return min(msg.count, room)

    # -------------------------------------------------- waiting for memory

    def _park(self, peer: _Peer, msg: p.Acquire, why: str) -> bool:
        """Make an acquire wait for memory (recalling idle slots); False if it may not.

        An acquire with the default wait waits only when something may come
        back (other clients hold slots, or slots of its class are in
        transit); one with its own timeout waits whatever, since any
        release, recall or exit may serve it. Neither waits for more than
        the whole budget. While it waits, its recalls go out again every
        ``RECALL_EVERY`` seconds (``_expire_waiting``).
        """
        explicit = msg.wait != p.WAIT_DEFAULT
        wait = msg.wait / 1000 if explicit else self.acquire_wait
        if wait <= 0:
            return False
        arena = self.arena
        slot_size = arena.class_size(msg.size)
        if (slot_size or msg.size) > arena.memory:
            return False  # more than the whole budget: nothing can come back for it
        waiter = _Waiter(peer, msg, slot_size, time.monotonic() + wait, set())
        # Slots in transit may already sit in a receiver's cache, its claim
        # notices still queued: when they arrive, it is recalled too.
        if not (
            self._recall_for(waiter)
            or explicit
            or (slot_size is not None and arena.transit_count(slot_size))
        ):
            return False
        waiter.why = why
        peer.parked = True
        self._waiting.append(waiter)
        log.debug(
            "client %d waits for %s-byte slots; recalled from %s",
            peer.id,
            slot_size,
            sorted(waiter.recalled),
        )
        return True

    def _recall_for(self, waiter: _Waiter) -> bool:
        """Recall what may serve ``waiter``; False if no other client holds a slot.

        Every client holding slots (the waiter too: it reads recalls while it
        waits) is asked for its idle slots of every class: a slot of the
        waiter's class serves it, and the pages of any other class serve it
        once the budget is spent. One kind of recall, so that one unread
        recall never holds back another (``_recall``). Only other clients'
        slots are worth waiting for.
        """
        arena = self.arena
        mine = waiter.peer.id
        waiter.next_recall = time.monotonic() + RECALL_EVERY
        found = False
        for peer in self._peers.values():
            if arena.held_by(peer.id):
                self._recall(peer, EVERY_CLASS, waiter.msg.count)
                if peer.id != mine:
                    waiter.recalled.add(peer.id)
                    found = True
        return found

    def _recall(self, peer: _Peer, slot_size: int, count: int) -> None:
        """Ask ``peer`` to return its idle ``slot_size`` slots, unless it has yet to read that.

        A client that does not read (paused, in a debugger, its thread
        gone) thus gets one Recall per class, not one per waiting acquire.
        """
        if slot_size in peer.recalled and (peer.outq or _unread(peer.sock)):
            return
        peer.recalled.add(slot_size)
        self._send(peer, p.encode(p.Recall(0, slot_size, count)))

    def _recall_late(self, peer: _Peer) -> None:
        """``peer``'s notices gave it slots that parked acquires wait for: recall them."""
        for waiter in self._waiting:
            if (
                waiter.slot_size is not None
                and waiter.peer is not peer
                and peer.id not in waiter.recalled
                and self.arena.held_by(peer.id, waiter.slot_size)
            ):
                waiter.recalled.add(peer.id)
                self._recall(peer, EVERY_CLASS, waiter.msg.count)

    def _serve_waiting(self) -> None:
        """Memory came back: grant parked acquires, first come first served per class."""
        blocked: set[int | None] = set()
        for waiter in list(self._waiting):
            if waiter not in self._waiting or waiter.slot_size in blocked:
                continue  # served or dropped by a nested call, or behind an earlier one
            if waiter.peer.id not in self._peers:
                self._waiting.remove(waiter)
                continue
            try:
                self._grant(waiter.peer, waiter.msg)
            except QuotaExceededError as exc:
                self._unpark(waiter, exc.code, str(exc))
            except PoolExhaustedError as exc:
                waiter.why = str(exc)
                blocked.add(waiter.slot_size)  # still nothing for this class: it waits on
            except ShmpoolError as exc:
                self._unpark(waiter, exc.code, str(exc))
            else:
                self._unpark(waiter)

    def _unpark(self, waiter: _Waiter, code: str = "", text: str = "") -> None:
        """``waiter`` leaves the queue: granted already, or refused with ``code``."""
        self._waiting.remove(waiter)
        waiter.peer.parked = False
        if code:
            self._send(waiter.peer, p.encode(p.Error(waiter.msg.req, code, text[: p.MAX_TEXT])))

    def _expire_waiting(self) -> None:
        """Refuse the acquires whose wait is over; recall again for the others."""
        if not self._waiting:
            return
        now = time.monotonic()
        for waiter in list(self._waiting):
            if waiter.peer.id not in self._peers:
                self._waiting.remove(waiter)
            elif waiter.deadline <= now:
                what = (
                    f"{waiter.slot_size}-byte slot"
                    if waiter.slot_size
                    else f"{waiter.msg.size} bytes"
                )
                text = f"no {what} came free in time: {waiter.why}"
                self._unpark(waiter, "exhausted", text)
            elif waiter.next_recall <= now:
                self._recall_for(waiter)

    def _apply_notices(self, peer: _Peer, flat: tuple[int, ...]) -> tuple[int, ...]:
        """Apply ``peer``'s handoff notices in order; return those that must wait.

        ``flat`` is ``Notices.flat``. A claim may name a slot the books have
        not caught up with: other clients' notices, still unread, will bring
        it there. It waits, and so do the notices after it (they may name
        the same slot).

        Raises:
            ProtocolError: a notice no correct client sends.
        """
        arena = self.arena
        deadline = time.monotonic() + self.transit_timeout
        try:
            i = arena.apply_notices(peer.id, flat, deadline)
        except ShmpoolError as exc:  # a correct client only hands on what it holds
            raise ProtocolError(f"bad handoff notice: {exc}") from None
        if i == len(flat):
            return ()
        _, segment, index, generation, _ = flat[i : i + p.NOTICE_WORDS]
        if not arena.awaits_detach(p.SlotRef(segment, index, generation)):
            raise ProtocolError("a claim of a slot that is not in transit")
        return flat[i:]

    def _attach(self, peer: _Peer, msg: p.Attach) -> None:
        deadline = time.monotonic() + self.transit_timeout
        g = self.arena.attach(
            peer.id, msg.slot, msg.token, deadline, capacity=msg.capacity, readers=msg.readers
        )
        reply = p.encode_grant(msg.req, g.slot_size, g.slots, g.segments, g.lent)
        self._send(peer, reply, g.fds)

    def _pause(self, peer: _Peer) -> None:
        """Stop reading from ``peer`` (its next messages may name the claimed slot)."""
        peer.paused = True
        self._watch(peer)

    def _resume(self, peer: _Peer) -> None:
        peer.paused = False
        self._watch(peer)

    def _watch(self, peer: _Peer) -> None:
        """Have the selector watch what ``peer``'s state asks for: its requests, its queue."""
        events = (selectors.EVENT_READ if peer.reading else 0) | (
            selectors.EVENT_WRITE if peer.outq else 0
        )
        if events == peer.events or peer.id not in self._peers:
            return
        if not peer.events:
            self._sel.register(peer.sock, events, self._on_peer)
        elif not events:
            self._sel.unregister(peer.sock)
        else:
            self._sel.modify(peer.sock, events, self._on_peer)
        peer.events = events

    def _serve_claiming(self) -> None:
        """Apply notices that overtook the notices they depend on; drop the bogus.

        Applying one client's waiting notices may unblock another's (a slot
        handed A to B to C), so this goes round until nothing moves.
        """
        now = time.monotonic()
        moved = True
        while moved and self._claiming:
            moved = False
            waiting, self._claiming = self._claiming, []
            for peer, items, deadline in waiting:
                if peer.id not in self._peers:
                    continue
                try:
                    rest = self._apply_notices(peer, items)
                except ProtocolError as exc:
                    rest, deadline = items, now  # refused now: as bogus as one never matched
                    log.debug("client %d (pid %d): %s", peer.id, peer.pid, exc)
                moved = moved or len(rest) < len(items)
                if not rest:
                    self._resume(peer)
                elif deadline > now:
                    self._claiming.append((peer, rest, deadline))
                else:
                    log.warning("client %d (pid %d) sent a bogus claim", peer.id, peer.pid)
                    self._drop(peer, "bogus claim", gone=False)

    def _serve_attaching(self) -> None:
        """Retry Attaches that arrived before their sender's notice; refuse the hopeless."""
        if not (self._attaching or self._claiming):
            return
        if self._claiming:
            self._serve_claiming()
        now = time.monotonic()
        waiting, self._attaching = self._attaching, []
        for peer, msg, deadline in waiting:
            if peer.id not in self._peers:
                continue
            try:
                self._attach(peer, msg)
            except StaleHandleError as exc:
                if deadline > now and self.arena.awaits_detach(msg.slot, shared=msg.readers > 0):
                    self._attaching.append((peer, msg, deadline))
                    continue
                self._send(peer, p.encode(p.Error(msg.req, exc.code, str(exc))))
            peer.parked = False

    def _release_idle(self) -> None:
        """Every ``idle_release / 2`` seconds: idle free slots give their pages back.

        And a client that sent nothing for two passes in a row (at least
        ``idle_release`` seconds) is asked for the slots it caches, once
        until it speaks again, so that a cache its own settings keep longer
        does not hold memory for ever.
        """
        if not self.idle_release:
            return
        now = time.monotonic()
        if now < self._idle_due:
            return
        self._idle_due = now + self.idle_release / 2
        freed = self.arena.release_idle()
        if freed:
            log.debug("gave %s of idle free slots back to the OS", format_size(freed))
        arena = self.arena
        for peer in self._peers.values():
            heard = arena.messages_of(peer.id)
            peer.quiet = peer.quiet + 1 if heard == peer.heard else 0
            peer.heard = heard
            if peer.quiet == 2 and arena.held_by(peer.id):
                self._recall(peer, EVERY_CLASS, 1)

    def _expire_transit(self) -> None:
        """Handles nobody attached in time: their slots go back to the free lists."""
        if self.arena.in_transit() and self.arena.expire_transit(time.monotonic()):
            log.debug("freed slots whose handles were never attached")
            self._serve_waiting()

    def _next_timeout(self) -> float:
        """Seconds until the nearest deadline (waiting acquire or attach, transit); 1 at most."""
        deadlines = [min(w.deadline, w.next_recall) for w in self._waiting]
        if self.idle_release:
            deadlines.append(self._idle_due)
        if self._hellos:
            deadlines.append(self._hellos[0][0])
        if self._stats_waiting:
            deadlines.append(self._stats_due)
        deadlines += [deadline for _, _, deadline in self._attaching]
        deadlines += [deadline for _, _, deadline in self._claiming]
        transit = self.arena.next_deadline()
        if transit is not None:
            deadlines.append(transit)
        if not deadlines:
            return 1.0
        return max(0.0, min(1.0, min(deadlines) - time.monotonic()))

    def _hello(self, peer: _Peer, msg: p.Hello) -> None:
        if msg.version != p.VERSION:
            raise ProtocolError(
                f"protocol version {msg.version} is not supported (manager speaks {p.VERSION}); "
                "install the same shmpool version in clients and manager"
            )
        peer.welcomed = True
        peer.name = msg.name[:64]
        key = secrets.randbits(63) | 1  # never 0: 0 means "tokens not checked"
        self.arena.add_conn(peer.id, peer.pid, peer.name, key, lends=bool(msg.lends))
        welcome = p.Welcome(
            msg.req,
            p.VERSION,
            self.pid,
            self.classes.min_size,
            self.classes.max_size,
            peer.id,
            self.instance,
            int(self.tickets),
            key,
            int(self.transit_timeout * 1000),
        )
        self._send(peer, p.encode(welcome))

    # ---------------------------------------------------------------- limits

    def _expire_hellos(self) -> None:
        """Close connections that did not say Hello in time (they hold nothing)."""
        now = time.monotonic()
        while self._hellos and (self._hellos[0][0] <= now or self._hellos[0][1].welcomed):
            _, peer = self._hellos.popleft()
            if not peer.welcomed and self._peers.get(peer.id) is peer:
                log.warning("client %d (pid %d) sent no Hello in time", peer.id, peer.pid)
                text = f"no Hello within {self.hello_timeout} s"
                self._send(peer, p.encode(p.Error(0, "protocol", text)))
                self._drop(peer, "handshake timeout")

    def _stats_request(self, peer: _Peer, req: int) -> None:
        """Answer a Stats request now, or, if one was built too recently, at the next build.

        Building costs O(clients + segments); spacing builds by ``STATS_DUTY``
        times their cost keeps a client that asks in a loop from slowing the
        others: it waits, and its later requests wait unread behind it.
        """
        self._stats_waiting.append((peer, req))
        if time.monotonic() >= self._stats_due:
            self._serve_stats()
        else:
            peer.stats_wait = True
            self._watch(peer)

    def _serve_stats(self) -> None:
        """Build the statistics once for every Stats request that waits, if it is time."""
        if not self._stats_waiting or time.monotonic() < self._stats_due:
            return
        waiting, self._stats_waiting = self._stats_waiting, []
        started = time.monotonic()
        stats = self.stats()
        for peer, req in waiting:
            self._send(peer, p.encode(p.StatsReply(req, self._with_leases(stats, peer, req))))
        done = time.monotonic()
        self._stats_due = done + STATS_DUTY * (done - started)
        for peer, _ in waiting:
            if peer.stats_wait:
                peer.stats_wait = False
                self._watch(peer)

    def _with_leases(self, stats: dict[str, Any], peer: _Peer, req: int) -> dict[str, Any]:
        """``stats``, plus the long-held leases if this request asked for them."""
        older_than = self._stats_leases.pop((peer.id, req), None)
        if older_than is None:
            return stats
        return {**stats, "leases": self._lease_reports.section(older_than, self._peers)}

    def stats(self) -> dict[str, Any]:
        """The arena's statistics plus the manager's own identity."""
        s = self.arena.stats()
        if len(s["clients"]) > MAX_LISTED_CLIENTS:
            s["clients_omitted"] = len(s["clients"]) - MAX_LISTED_CLIENTS
            del s["clients"][MAX_LISTED_CLIENTS:]
        s["manager"] = {
            "pid": self.pid,
            "address": self.address,
            "version": p.VERSION,
            "uptime": round(time.monotonic() - self._started, 3),
            "connections": len(self._peers),
            "quarantined": len(self._quarantined),
            "queued_bytes": self._outbytes,
            "throttled": sum(1 for peer in self._peers.values() if peer.throttled),
            "waiting": len(self._waiting),
        }
        s["idle_release"] = self.idle_release
        return s

    # -------------------------------------------------------------- output

    def _send(self, peer: _Peer, data: bytes, fds: Sequence[int] = ()) -> None:
        if peer.id not in self._peers:
            return
        if peer.outq:
            self._queue(peer, data, fds)
            return
        try:
            _sendmsg(peer.sock, data, fds)
        except (BlockingIOError, InterruptedError):
            self._queue(peer, data, fds)
        except OSError as exc:
            self._drop(peer, f"send failed: {exc.strerror}")

    def _queue(self, peer: _Peer, data: bytes, fds: Sequence[int]) -> None:
        """Keep a reply ``peer`` has no room for; throttle it if it leaves too many unread."""
        peer.outq.append((data, fds))
        peer.outbytes += len(data)
        self._outbytes += len(data)
        if not peer.throttled and (
            peer.outbytes > PEER_QUEUE_BYTES or self._outbytes > self.max_queued_bytes
        ):
            log.debug("client %d (pid %d) reads slowly: not read from", peer.id, peer.pid)
            peer.throttled = True
        self._watch(peer)

    def _flush(self, peer: _Peer) -> None:
        while peer.outq:
            data, fds = peer.outq[0]
            try:
                _sendmsg(peer.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(peer, f"send failed: {exc.strerror}")
                return
            peer.outq.popleft()
            peer.outbytes -= len(data)
            self._outbytes -= len(data)
        peer.throttled = False
        self._watch(peer)

    def _drop(self, peer: _Peer, why: str, *, gone: bool = True) -> None:
        """Close ``peer``'s connection and settle its slots.

        ``gone``: it hung up, or its process exited, so its slots go back at
        once. Otherwise (the manager closes on it: it broke the protocol) its
        process may still write them; they stay quarantined until it exits.
        """
        if self._peers.pop(peer.id, None) is None:
            return
        self._by_fd.pop(peer.sock.fileno(), None)
        self._by_pidfd.pop(peer.pidfd, None)
        self._per_uid[peer.uid] -= 1
        if not self._per_uid[peer.uid]:
            del self._per_uid[peer.uid]
        self._outbytes -= peer.outbytes
        peer.outq.clear()
        peer.outbytes = 0
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(peer.sock)
        peer.sock.close()
        if (
            not gone
            and peer.pidfd >= 0
            and self.arena.holds_anything(peer.id)
            and _alive(peer.pidfd)
        ):
            self._quarantined[peer.pidfd] = peer.id  # its pidfd stays registered
            log.warning(
                "client %d (pid %d) %s; its %d slots wait until that process exits",
                peer.id, peer.pid, why, self.arena.held_by(peer.id),
            )  # fmt: skip
            return
        self._unwatch_exit(peer.pidfd)
        self._settle(peer.id, f"client {peer.id} (pid {peer.pid}) {why}")

    def _release_quarantine(self, pidfd: int) -> None:
        """A quarantined connection's process exited: its slots go back."""
        conn = self._quarantined.pop(pidfd)
        self._unwatch_exit(pidfd)
        self._settle(conn, f"quarantined client {conn} exited")

    def _unwatch_exit(self, pidfd: int) -> None:
        if pidfd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(pidfd)
            os.close(pidfd)

    def _settle(self, conn: int, why: str) -> None:
        """Return every slot of connection ``conn`` and serve whoever waited for them."""
        try:
            returned = self.arena.drop_conn(conn, time.monotonic(), self.transit_timeout)
        except Exception:  # its slots stay held: better lost than handed out twice
            log.exception("internal error settling the slots of client %d", conn)
            returned = 0
        log.debug("%s; %d slots returned", why, returned)
        if returned and self._waiting:
            self._serve_waiting()
        if self._claiming or self._attaching:
            self._serve_attaching()


def _sendmsg(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def _pidfd(pid: int) -> int:
    """A descriptor that becomes readable when process ``pid`` exits; -1 if none can be had.

    (The pid may be 0 for a peer in another pid namespace, or the process may
    be gone already; then only its socket's end-of-file tells.)
    """
    if pid <= 0:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1
    os.set_inheritable(fd, False)
    return fd


def _alive(pidfd: int) -> bool:
    """True while the process behind ``pidfd`` runs."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _unread(sock: socket.socket) -> int:
    """Bytes we sent on ``sock`` that the peer has not read yet (SIOCOUTQ)."""
    try:
        unread: int = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_INT.size)))[0]
        return unread
    except OSError:
        return 0


def _notify(fd: int | None, text: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, text.encode())
        os.close(fd)


def _raise_fd_limit() -> None:
    """Each segment is an open descriptor in the manager; allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
