"""Handles: a leased slot on its way from one process to another.

Ownership moves in two steps. ``lease.detach()`` puts the slot *in transit*
under an unguessable token (a keyed hash of the slot and its next
generation, which only this connection and the manager can compute; random
bits when the C extension pickles a lease) and returns a ``Handle`` naming
the slot, its next generation and that token. A class slot is *lent*: the
token goes in the slot's ticket word (``protocol.lent_word``) and the
manager hears nothing; the slot comes back to this process's cache when the
last process it was handed to releases it. Other slots (oversize, or a
sender without the C extension) go in the manager's keeping with a notice.
``pool.attach(handle)`` in any process connected to the same manager takes
the slot for that process, by swapping the ticket word when it has the
segment mapped, else by asking the manager; it succeeds once. A handle
that is attached twice, arrives after the transit timeout, carries a forged
token or generation, or comes from another manager is refused with
``StaleHandleError`` before any memory is mapped.

The handle's ``token`` is sealed with its ``length``, ``capacity`` and
``readers`` (``protocol.seal_token``, a cheap mix, its own inverse): the
receiver unseals it with the fields it reads, so a handle with any of them
changed yields a token that neither the word nor the manager holds, and is
refused with ``StaleHandleError`` like a forged one (the genuine handle
still attaches). The capacity and the read-only-ness are also checked
against the record: the segment's slot size where it is mapped, else the
manager's, which ``Attach`` asks (the slot's size; whether it is shared).
The seal catches altered handles, it is no secret: the record is what no
handle can change.

A handle nobody attaches gives its slot back when the transit timeout
passes (to its lender, or to the free lists), so a dropped handle or a
sender that dies leaks nothing.

Pickling a Lease (a ``multiprocessing.Queue``, a ``Pipe``, ``Pool.map``
arguments and results) detaches it at pickling time and attaches it at
unpickling time, in a pool of the receiving process connected to the same
manager (an open one, else ``shmpool.connect()``, i.e. ``$SHMPOOL_ADDRESS``).
The sender's Lease is closed from that moment: two processes can never both
write it, and a message that is never received gives the slot back after the
transit timeout.

Many readers: ``lease.share(readers=n)`` publishes the slot read-only to up
to ``n`` attaches of the same handle (in any processes, one process may
attach more than once); each gets a Lease whose view is read-only. The owner
gives up its lease as with ``detach``. The slot returns to the pool when the
last reader releases it (or dies) and no attach is pending; attaches not
made within the transit timeout lapse.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Handle"]


class Handle(NamedTuple):
    """A picklable reference to a slot in transit; give it to ``Pool.attach``."""

    instance: int  # the manager run that issued it
    segment: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose
    generation: int
    token: int  # the handoff's token, sealed with the three fields below (seal_token)
    length: int  # the bytes the lease showed
    capacity: int  # the slot's size class (or oversize length)
    readers: int = 0  # > 0: from Lease.share(); each attach is a read-only reader
