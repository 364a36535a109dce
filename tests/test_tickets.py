"""Claiming a handed-over slot by its ticket word, without a manager round trip.

A class slot is lent: its holder writes ``lent_word`` and tells nobody; the
receiver claims it by compare-and-swap and, on release, writes
``returned_word``, which the lender takes back into its cache. Slots in the
manager's keeping (oversize, a sender without the C extension, a lender that
went) use plain ``ticket_word`` and claim notices.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import MP_TIMEOUT, assert_balanced, client_entries, wait_for

import shmpool
from shmpool import buffer, janitor
from shmpool.protocol import claim_word, lent_word, returned_word, seal_token, ticket_word

pytestmark = pytest.mark.skipif(not buffer.SPEEDUPS, reason="ticket words need the C extension")

SIZE = 5000  # an 8 KiB slot


@pytest.fixture
def mgr() -> Any:
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="16MiB", transit_timeout=30) as m:
        yield m


def _mapped(sender: shmpool.Pool, receiver: shmpool.Pool) -> None:
    """Let the receiver map the sender's 8 KiB segment (the first attach asks the manager)."""
    lease = sender.acquire(SIZE)
    receiver.attach(lease.detach()).release()


def _token(handle: shmpool.Handle) -> int:
    """The handoff's token: the handle's, unsealed with its length, capacity and readers."""
    return seal_token(handle.token, handle.length, handle.capacity, handle.readers)


def _ticket(pool: shmpool.Pool, handle: shmpool.Handle) -> int:
    seg = pool._conn.segments[handle.segment]
    return int(buffer._speedups.load64(seg.tickets, 8 * handle.index))


def test_the_manager_says_tickets_are_on(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as pool:
        assert pool._conn.tickets_on
        lease = pool.acquire(SIZE)
        handle = lease.detach()
        assert _ticket(pool, handle) == lent_word(_token(handle), handle.generation)  # published
        pool.attach(handle).release()


@pytest.fixture
def quiet_janitors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Janitors that sleep for an hour: only the pools' own calls send notices."""
    monkeypatch.setattr(janitor, "JANITOR_PERIOD", 3600.0)


def _quiet_pool(m: shmpool.ManagerProcess) -> shmpool.Pool:
    return shmpool.Pool(m.address, idle_timeout=None)  # janitor period: JANITOR_PERIOD


def test_a_handoff_sends_nothing_and_the_slot_comes_back_by_its_word(
    mgr: shmpool.ManagerProcess, quiet_janitors: None
) -> None:
    with _quiet_pool(mgr) as a, _quiet_pool(mgr) as b:
        _mapped(a, b)
        a._lending.reclaim_lent()  # the slot _mapped lent
        lease = a.acquire(SIZE)
        lease.view[:4] = b"tick"
        sent_a, sent_b = a.messages, b.messages
        handle = lease.detach()
        assert _ticket(a, handle) == lent_word(_token(handle), handle.generation)
        got = b.attach(handle)
        assert _ticket(a, handle) == claim_word(b.client_id, handle.generation)
        assert bytes(got.view[:4]) == b"tick"
        got.release()
        assert _ticket(a, handle) == returned_word(handle.generation)
        assert (a.messages, b.messages) == (sent_a, sent_b)  # not a word to the manager
        assert a._lending.reclaim_lent() == 1  # the lender takes it back, in its cache
        assert _ticket(a, handle) == 0
        slot = a._caches[1][-1]
        assert (slot.ref.segment, slot.ref.index) == (handle.segment, handle.index)
        assert slot.ref.generation == handle.generation  # the next handle names one more
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        stats = a.stats()
        assert stats["in_transit"] == 0
        assert_balanced(stats)


def test_the_books_show_where_a_lent_slot_is(mgr: shmpool.ManagerProcess) -> None:
    """Stats read the words: lent and unclaimed is in transit, claimed is the claimer's."""
    with mgr.connect(name="a") as a, mgr.connect(name="b") as b:
        _mapped(a, b)
        a.trim()
        b.trim()
        handle = a.acquire(SIZE).detach()
        stats = a.stats()
        assert stats["in_transit"] == 1
        assert_balanced(stats)
        got = b.attach(handle)
        stats = a.stats()
        assert stats["in_transit"] == 0
        (entry,) = [c for c in stats["clients"] if c["id"] == b.client_id]
        assert entry["leased"] == 1
        assert_balanced(stats)
        got.release()
        stats = a.stats()
        (entry,) = [c for c in stats["clients"] if c["id"] == b.client_id]
        assert entry["leased"] == 0
        assert_balanced(stats)


def test_the_janitor_sends_what_is_queued(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        got = b.attach(a.acquire(SIZE).detach())
        # no call of either pool sends them: their janitors do, within a period
        stats = wait_for(
            lambda: (
                not a._conn.notices
                and not b._conn.notices
                and (s := mgr.stats())["in_transit"] == 0
                and any(c["id"] == b.client_id and c["leased"] for c in s["clients"])
                and s
            )
        )
        assert_balanced(stats)
        got.release()


def test_notices_go_out_before_the_next_request(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        handles = [a.acquire(SIZE).detach() for _ in range(3)]
        leases = [b.attach(h) for h in handles]
        stats = b.stats()  # b's claims go first, so the manager has them; a's are unsent
        mine = [c for c in stats["clients"] if c["id"] == b.client_id]
        assert mine[0]["leased"] >= 3  # applied by their tokens, before a said a word
        assert stats["in_transit"] == 0
        assert_balanced(stats)
        for lease in leases:
            lease.release()


def test_many_handoffs_send_no_message(mgr: shmpool.ManagerProcess, quiet_janitors: None) -> None:
    from shmpool.client import NOTICE_BATCH

    with _quiet_pool(mgr) as a, _quiet_pool(mgr) as b:
        _mapped(a, b)
        leases = [a.acquire(SIZE) for _ in range(2 * NOTICE_BATCH)]
        sent = a.messages
        handles = [lease.detach() for lease in leases]
        assert a.messages == sent  # lent, not told
        for h in handles:
            b.attach(h).release()
        assert a.messages == sent
        assert_balanced(b.stats())


def test_forged_and_repeated_claims_are_refused_locally(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        handle = a.acquire(SIZE).detach()
        before = b.messages
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle._replace(token=handle.token ^ 2))
        assert b.messages == before  # refused without asking anyone
        b.attach(handle).release()
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        with pytest.raises(shmpool.StaleHandleError):
            a.attach(handle)
        assert_balanced(a.stats())


def test_expiry_wins_against_a_late_claim() -> None:
    with (
        shmpool.start(memory="16MiB", transit_timeout=0.3) as m,
        m.connect() as a,
        m.connect() as b,
    ):
        _mapped(a, b)
        handle = a.acquire(SIZE).detach()
        wait_for(lambda: a.stats()["in_transit"] == 0)
        assert _ticket(b, handle) == 0
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        assert_balanced(a.stats())


def _claim_and_die(address: str, handle: shmpool.Handle, w: int) -> None:
    """A receiver that takes the slot by its ticket and dies before saying so."""
    try:
        pool = shmpool.connect(address, name="claimer")
        pool.acquire(SIZE).release()  # maps the segment the handle names
        seg = pool._conn.segments[handle.segment]
        claimed = claim_word(pool.client_id, handle.generation)
        word = lent_word(_token(handle), handle.generation)
        ok = buffer._speedups.cas64(seg.tickets, 8 * handle.index, word, claimed)
        os.write(w, b"1" if ok else b"0")
    finally:
        os._exit(0)  # no Claimed notice, no goodbye


@pytest.mark.timeout(60)
def test_a_borrower_that_dies_gives_the_slot_back_to_its_lender() -> None:
    with shmpool.start(memory="16MiB", transit_timeout=0.5) as m, m.connect() as a:
        lease = a.acquire(SIZE)
        handle = lease.detach()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _claim_and_die(m.address, handle, w)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"1"
        os.waitpid(pid, 0)
        stats = wait_for(lambda: not client_entries(s := a.stats(), pid) and s)
        assert stats["in_transit"] == 0
        assert_balanced(stats)
        # the manager wrote it returned; the lender's janitor takes it back
        wait_for(lambda: _ticket(a, handle) == 0)
        assert not a._lending.lent
        with pytest.raises(shmpool.StaleHandleError):
            a.attach(handle)


def _handle_by_hand(pool: shmpool.Pool, lease: shmpool.Lease) -> shmpool.Handle:
    """What detach() does, minus the Detach message: publish a token, build a handle."""
    slot = lease._slot
    token = 0x5EED_1234_5678_9ABD
    pool._lending._publish_ticket(slot.ref, ticket_word(token, slot.ref.generation + 1))
    lease._disown()
    ref = slot.ref
    length, capacity = len(slot.view), slot.capacity
    return shmpool.Handle(
        pool.manager_instance, ref.segment, ref.index, ref.generation + 1,
        seal_token(token, length, capacity, 0), length, capacity,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_sender_gone_before_its_detach_after_a_claim(mgr: shmpool.ManagerProcess) -> None:
    """The claim wins: the slot goes to the claimer, never back to the free lists."""
    with mgr.connect(name="receiver") as b:
        a = mgr.connect(name="sender")
        _mapped(a, b)
        lease = a.acquire(SIZE)
        lease.view[:3] = b"abc"
        handle = _handle_by_hand(a, lease)
        got = b.attach(handle)  # claimed locally; its notice waits for a Detach that never comes
        a.close()  # the sender's connection ends without the Detach
        stats = wait_for(lambda: (s := b.stats())["in_transit"] == 0 and s)
        mine = [c for c in stats["clients"] if c["name"] == "receiver"]
        assert mine and mine[0]["leased"] >= 1
        assert bytes(got.view[:3]) == b"abc"
        assert_balanced(stats)
        got.release()
        b.trim()
        assert_balanced(b.stats())


@pytest.mark.timeout(60)
def test_sender_gone_with_a_published_token_frees_after_transit() -> None:
    with shmpool.start(memory="16MiB", transit_timeout=0.3) as m, m.connect() as watcher:
        a = m.connect(name="sender")
        handle = _handle_by_hand(a, a.acquire(SIZE))
        a.close()  # no Detach: the manager sees the token in the word and waits for a taker
        wait_for(lambda: watcher.stats()["in_transit"] == 0)
        stats = watcher.stats()
        assert_balanced(stats)
        assert sum(c["leased"] for c in stats["clients"]) == 0
        with pytest.raises(shmpool.StaleHandleError):
            watcher.attach(handle)


PURE_SENDER = """
import pickle, sys
import shmpool
from shmpool import buffer, janitor
assert not buffer.SPEEDUPS
pool = shmpool.connect(sys.argv[1])
lease = pool.acquire(5000)
lease.view[:4] = b"pure"
sys.stdout.write(pickle.dumps(lease.detach()).hex())
sys.stdout.flush()
sys.stdin.read()  # stay connected until the parent has attached
"""

PURE_RECEIVER = """
import pickle, sys
import shmpool
from shmpool import buffer, janitor
assert not buffer.SPEEDUPS
pool = shmpool.connect(sys.argv[1])
lease = pool.attach(pickle.loads(bytes.fromhex(sys.stdin.read())))
sys.stdout.write(bytes(lease.view[:4]).decode())
lease.release()
"""


def _pure(script: str, address: str, tmp_path: Any, stdin: str = "") -> Any:
    import subprocess
    import sys

    env = dict(os.environ, SHMPOOL_NO_SPEEDUPS="1")
    return subprocess.Popen(
        [sys.executable, "-c", script, address],
        cwd=tmp_path, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_a_sender_without_the_extension_hands_over(
    mgr: shmpool.ManagerProcess, tmp_path: Any
) -> None:
    """Its Detach publishes the token for it; the handle outlives the sender's exit."""
    import pickle

    proc = _pure(PURE_SENDER, mgr.address, tmp_path)
    out, err = proc.communicate("", timeout=MP_TIMEOUT)
    assert proc.returncode == 0, err
    with mgr.connect() as pool:
        lease = pool.attach(pickle.loads(bytes.fromhex(out)))
        assert bytes(lease.view[:4]) == b"pure"
        lease.release()
        assert_balanced(pool.stats())


@pytest.mark.timeout(60)
def test_a_receiver_without_the_extension_attaches(
    mgr: shmpool.ManagerProcess, tmp_path: Any
) -> None:
    import pickle

    with mgr.connect() as pool:
        lease = pool.acquire(5000)
        lease.view[:4] = b"fast"
        handle = lease.detach()
        proc = _pure(PURE_RECEIVER, mgr.address, tmp_path)
        out, err = proc.communicate(pickle.dumps(handle).hex(), timeout=MP_TIMEOUT)
        assert proc.returncode == 0, err
        assert out == "fast"
        assert_balanced(pool.stats())


def test_a_slot_handed_to_ourselves_again_and_again(mgr: shmpool.ManagerProcess) -> None:
    """Each claim of the same slot by the same client is told apart from the last.

    The manager clears a claim from the ticket word only if it is the claim
    its notice names; clearing a newer one would let it publish an old token
    over a slot this process holds (and a second attach of that handle win).
    """
    import pickle

    with mgr.connect() as pool:
        pool.acquire(SIZE).release()
        for i in range(3000):
            lease = pickle.loads(pickle.dumps(pool.acquire(SIZE)))  # detach, then claim
            lease.view[:4] = i.to_bytes(4, "little")
            lease.release()
        stats = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
        assert_balanced(stats)


def _detach_and_die(address: str, w: int) -> None:
    """A sender whose DETACHED notice is still queued when it dies."""
    try:
        pool = shmpool.connect(address, name="sender")
        lease = pool.acquire(SIZE)
        lease.view[:4] = b"gone"
        handle = lease.detach()  # its notice is queued (the janitor may send it, or not)
        os.write(w, ",".join(map(str, handle)).encode())
    finally:
        os._exit(0)  # no flush, no goodbye


@pytest.mark.timeout(60)
def test_a_sender_that_dies_with_its_notice_queued(mgr: shmpool.ManagerProcess) -> None:
    """The word holds the token, so the manager keeps the slot for the handle."""
    with mgr.connect(name="receiver") as pool:
        pool.acquire(SIZE).release()  # maps the segment the sender's slot will be in
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _detach_and_die(mgr.address, w)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            fields = f.read()
        os.waitpid(pid, 0)
        handle = shmpool.Handle(*map(int, fields.split(b",")))
        lease = pool.attach(handle)
        assert bytes(lease.view[:4]) == b"gone"
        with pytest.raises(shmpool.StaleHandleError):
            pool.attach(handle)
        lease.release()
        stats = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
        assert_balanced(stats)
        assert not [c for c in stats["clients"] if c["name"] == "sender"]


@pytest.mark.timeout(60)
def test_slots_claimed_but_not_yet_told_are_recalled_for_a_short_acquire() -> None:
    """The budget is 4 slots, all in B's cache by claims B has not told the manager of.

    A's next acquire finds no free slot and no holder in the books, only slots
    in transit; it waits, B's notices arrive, B is recalled, and A gets a slot.
    """
    mib = 1 << 20
    with (
        shmpool.start(min_size="1MiB", max_size="1MiB", memory="4MiB", acquire_wait=10) as m,
        shmpool.Pool(m.address, name="A", idle_timeout=None) as a,
        shmpool.Pool(m.address, name="B", idle_timeout=None) as b,
    ):
        b.attach(a.acquire(mib).detach()).release()  # B maps the segment
        b.trim()  # and gives that slot back
        leases = [a.acquire(mib) for _ in range(4)]  # the whole budget
        for lease in leases:
            b.attach(lease.detach()).release()  # claimed by ticket word, into B's cache
        got = a.acquire(mib)  # sends A's notices; the books show only slots in transit
        got.view[:2] = b"ok"
        assert bytes(got.view[:2]) == b"ok"
        got.release()
        stats = a.stats()
        assert_balanced(stats)
        assert stats["classes"][0]["total"] == 4  # no memory beyond the budget


def _lend_one_token(address: str, conn: Any) -> None:
    with shmpool.Pool(address) as pool:
        lease = pool.acquire(SIZE)
        fields = lease.__reduce__()[1]
        conn.send(fields[4])
        pool.attach(shmpool.Handle(*fields)).release()  # take it back before closing


def test_a_forked_child_draws_its_own_tokens(mgr: shmpool.ManagerProcess) -> None:
    """A fork drops the parent's batch of random tokens: the child does not repeat them."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with mgr.connect() as a:
        a.acquire(SIZE).__reduce__()  # the parent draws a batch
        ours, theirs = ctx.Pipe()
        child = ctx.Process(target=_lend_one_token, args=(mgr.address, theirs))
        child.start()
        assert ours.poll(MP_TIMEOUT)
        token = ours.recv()
        child.join(MP_TIMEOUT)
        assert child.exitcode == 0
        fields = a.acquire(SIZE).__reduce__()[1]
        assert fields[4] != token
        a.attach(shmpool.Handle(*fields)).release()
        ours.close()
        theirs.close()


def test_the_c_token_is_fresh_for_every_lend(mgr: shmpool.ManagerProcess) -> None:
    """Pickling in C draws each lent slot's token at random: odd, 62 bits, never repeated."""
    import pickle

    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        tokens = set()
        for _ in range(50):
            lease = a.acquire(SIZE)
            fields = lease.__reduce__()[1]  # the C path: the handle as plain ints
            handle = shmpool.Handle(*fields)
            token = _token(handle)
            assert token & 1 and 0 < token < 1 << 62
            tokens.add(token)
            assert _ticket(a, handle) == lent_word(_token(handle), handle.generation)
            got = b.attach(handle)
            got.release()
        assert len(tokens) == 50
        lease = a.acquire(SIZE)
        lease.view[:3] = b"abc"
        got = pickle.loads(pickle.dumps(lease))
        assert bytes(got.view[:3]) == b"abc"
        got.release()
        assert_balanced(a.stats())


def test_a_pickled_lease_names_the_public_rebuild_function(mgr: shmpool.ManagerProcess) -> None:
    """Pickles name ``shmpool.registry.rebuild_lease``; one naming ``shmpool._attach_anywhere``
    (the name before it, under the same protocol version) still loads."""
    import pickle

    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        lease = a.acquire(SIZE)
        lease.view[:2] = b"hi"
        data = pickle.dumps(lease)
        assert b"shmpool.registry" in data and b"rebuild_lease" in data
        assert b"shmpool.client" not in data
        got = pickle.loads(data)
        assert bytes(got.view[:2]) == b"hi"
        got.release()
        lease = a.acquire(SIZE)
        lease.view[:2] = b"ho"
        fn, fields = lease.__reduce__()
        assert fn is shmpool.rebuild_lease
        args = pickle.dumps(fields, 2)[2:-1]  # the tuple's opcodes, without header and STOP
        older = b"\x80\x02cshmpool\n_attach_anywhere\n" + args + b"R."
        got = pickle.loads(older)
        assert bytes(got.view[:2]) == b"ho"
        got.release()
        assert_balanced(a.stats())


def test_a_pool_subclass_lends_through_getattr(mgr: shmpool.ManagerProcess) -> None:
    """The C paths read a Pool's members at their offsets; a subclass's through getattr."""

    class Mine(shmpool.Pool):
        pass

    with Mine(mgr.address) as a, mgr.connect() as b:
        _mapped(a, b)
        for _ in range(3):
            lease = a.acquire(SIZE)
            lease.view[:3] = b"sub"
            handle = shmpool.Handle(*lease.__reduce__()[1])  # the C hand_off
            assert _ticket(a, handle) == lent_word(_token(handle), handle.generation)
            got = b.attach(handle)
            assert bytes(got.view[:3]) == b"sub"
            got.release()
        assert_balanced(a.stats())


@pytest.mark.skipif(not buffer.SPEEDUPS, reason="needs the C extension")
def test_c_reads_the_collaborators_it_is_given_by_name(manager: Any) -> None:
    """The C paths get a connection and a lending as arguments, and read them by name:
    something else in their place is an AttributeError naming what was missing."""
    c = buffer._speedups
    with manager.connect() as pool:
        lease = pool.acquire(SIZE)
        fields = (pool.manager_instance, 0, 0, 1, 1, 1, SIZE, 0)
        with pytest.raises(AttributeError, match="tickets_on"):
            c.take(object(), pool._lending, fields)
        with pytest.raises(AttributeError, match="'pool'"):
            c.hand_off(pool._conn, object(), lease)
        with pytest.raises(AttributeError, match="'lent'"):
            c.reclaim(pool._conn, object())
        with pytest.raises(TypeError):
            c.take(pool._conn, pool._lending)  # three arguments, not two
        assert not lease.closed  # nothing happened to it
        lease.release()
