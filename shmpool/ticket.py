"""The ticket word: one 64-bit word per slot that says who may take the slot.

A segment's header holds one word per slot, read and written with atomics
(``load64``, ``store64``, ``cas64``) by the clients that map the segment and by
the manager. It lets a slot change hands with no round trip to the manager:
the holder publishes a ticket, the receiver claims it by compare-and-swap,
and the manager (or the lender) catches up by reading the word. Everything
about the bits is here; where the words are read and written is elsewhere
(``arena`` for the manager, ``client`` and ``_speedups.c`` for clients).

    bit       63   62  61                    32 31                 0
            +----+----+---------------------------------------------+
    ticket  |  0 |  L | (token ^ generation * _MIX) & TICKET_BITS   |
            +----+----+------------------------+--------------------+
    claim   |  1 |  generation & 0x7FFF_FFFF   |  client id         |
            +----+-----------------------------+--------------------+
    0       nothing published
    L       LENT: 1 in a lent_word, 0 in a plain ticket_word
    claim   claim_word(client id, generation); returned_word: client id 0

Bit 63 (``CLAIMED``) picks the row. Read with it clear, the word is a
*ticket*: a handle's token mixed with the generation the handle names, and
bit 62 (``LENT``) tells a ``lent_word`` (a lender's ticket, the manager not
told) from a plain ``ticket_word`` (a handoff in the manager's keeping,
which wrote it). Read with bit 63 set, it is a *claim*: bit 62 is then a
bit of the generation, not ``LENT``; ``claim_word`` names the client that
took the slot; a claim by client 0, which no client is, is a
``returned_word``: the borrower let go and the lender may take the slot back.
A word of 0 has nothing published: the books say where the slot is.

Lifecycles. Handed on: 0 -> ``ticket_word`` -> ``claim_word`` -> 0 (the
manager clears the claim when its notice comes). Lent: 0 -> ``lent_word`` ->
``claim_word`` -> ``returned_word`` -> 0 (the lender takes it back), or the
borrower lends it on (a ``lent_word`` of the next generation). Who writes
each kind, and when: docs/design.md, "Ticket words".

Why these encodings. A token is odd and below 2**62 (``ticket_token``, a
keyed hash; or a lender's, random), so it fits a ticket. Mixing in the
generation (XOR with the generation times an odd constant) makes a word
match only a handle naming both, and since XOR is its own inverse the
manager gets the token back from a word it reads (``token_of``). A claim
has room for 31 bits of the generation only: enough that clearing a claim
by compare-and-swap never clears a later claim of the same slot by the same
client, and with a floor from the books ``generation_at_least`` recovers the
whole generation. Client ids stay below 2**32. (A plain ``ticket_word`` is 0 for one token in 2**62
of each generation; a ``lent_word`` never is.)

Clients write the words, so a reader believes a word only as far as it could
have been made (see ``arena``); these functions only encode and decode.

The C twins in ``_speedups.c`` (``ticket_word``, ``lent_word``,
``claim_word``, ``returned_word``, ``is_returned``, ``word_low31``,
``generation_at_least``, ``seal_token``) must give the same bits:
``tests/test_ticket_word.py`` checks them against these.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import TypeAlias

__all__ = [
    "ANY_CLAIM",
    "ANY_LENT",
    "CLAIMED",
    "CLIENT_BITS",
    "GENERATION_BITS",
    "LENT",
    "TICKET_BITS",
    "Pattern",
    "claim_word",
    "claimer_of",
    "claims_by",
    "generation_at_least",
    "generation_low31",
    "is_claim_for",
    "is_claimed",
    "is_lent",
    "is_returned",
    "is_ticket",
    "lent_word",
    "returned_word",
    "seal_token",
    "ticket_token",
    "ticket_word",
    "token_maker",
    "token_of",
    "word_low31",
]

# ------------------------------------------------------------------ layout

#: Bit 63: the word is a claim (``claim_word``) or a return (``returned_word``).
CLAIMED = 1 << 63
#: Bit 62, with bit 63 clear: the ticket is a lender's (``lent_word``).
LENT = 1 << 62
#: Bits 61..0 of a ticket: the token mixed with the generation.
TICKET_BITS = (1 << 62) - 1
#: Bits 31..0 of a claim: the client id (0 in a returned word).
CLIENT_BITS = 0xFFFF_FFFF
#: The generation bits a claim keeps (its low 31), stored at bits 62..32.
GENERATION_BITS = 0x7FFF_FFFF
_GENERATION_SHIFT = 32

#: An odd 64-bit constant: ``ticket_word`` mixes the generation with it.
_MIX = 0x9E37_79B9_7F4A_7C15

#: A ``(mask, value)`` pair: a word ``w`` matches if ``w & mask == value``
#: (what ``_speedups.find_words`` scans a segment's words for).
Pattern: TypeAlias = tuple[int, int]
#: Every claim and every returned word (``is_claimed``).
ANY_CLAIM: Pattern = (CLAIMED, CLAIMED)
#: Every lender's ticket (``is_lent``).
ANY_LENT: Pattern = (CLAIMED | LENT, LENT)


# --------------------------------------------------------------- encodings


def ticket_word(token: int, generation: int) -> int:
    """The ticket word that publishes a handle of ``generation`` under ``token``.

    The token mixed with the generation, so that the word matches only a
    handle that names both: a receiver whose handle carries the genuine
    token beside a changed generation finds a word that does not match, and
    the handle is stale for it. Bits 63 and 62 stay clear; for a given
    generation each token has its own word, so the manager can recover the
    token from a word it reads (``token_of``).
    """
    return (token ^ generation * _MIX) & TICKET_BITS


def lent_word(token: int, generation: int) -> int:
    """The ticket word of a slot its holder lent out without telling the manager.

    The lender keeps the slot in its books and watches the word: the
    receiver claims it (``claim_word``), and when it lets go it writes
    ``returned_word``, which the lender takes back into its cache. Nothing
    passes through the manager unless a process dies or a handle expires.
    """
    return ticket_word(token, generation) | LENT


def claim_word(client_id: int, generation: int) -> int:
    """The ticket word of a slot that ``client_id`` claimed by a handle of ``generation``.

    The generation's low 31 bits are in it, so that clearing a claim (a
    compare-and-swap from this value) never clears a later claim of the same
    slot by the same client. Client ids stay below 2**32.
    """
    return CLAIMED | (generation & GENERATION_BITS) << _GENERATION_SHIFT | (client_id & CLIENT_BITS)


def returned_word(generation: int) -> int:
    """The ticket word of a lent slot its last borrower let go of (a claim by client 0)."""
    return CLAIMED | (generation & GENERATION_BITS) << _GENERATION_SHIFT


def claims_by(client_id: int) -> Pattern:
    """The ``Pattern`` of every claim by ``client_id`` (below 2**32), of any generation."""
    return CLAIMED | CLIENT_BITS, CLAIMED | client_id


# -------------------------------------------------------------- predicates


def is_ticket(word: int) -> bool:
    """True for a ticket: a ``ticket_word`` or a ``lent_word`` (not 0, not a claim)."""
    return word != 0 and not word & CLAIMED


def is_lent(word: int) -> bool:
    """True for a ``lent_word``: a lender's ticket."""
    return word & (CLAIMED | LENT) == LENT


def is_claimed(word: int) -> bool:
    """True for a ``claim_word`` and for a ``returned_word`` (a claim by client 0)."""
    return bool(word & CLAIMED)


def is_returned(word: int) -> bool:
    """True for a ``returned_word``."""
    return word >> 63 == 1 and not word & CLIENT_BITS


def is_claim_for(word: int, generation: int) -> bool:
    """True for a claim or a return whose generation bits are ``generation``'s low 31."""
    return word == claim_word(claimer_of(word), generation)


# ---------------------------------------------------------------- decoding


def claimer_of(word: int) -> int:
    """The client id in a claimed ticket word (0 in a returned one)."""
    return word & CLIENT_BITS


def word_low31(word: int) -> int:
    """The low 31 bits of the generation in a claim or returned word."""
    return word >> _GENERATION_SHIFT & GENERATION_BITS


def token_of(word: int, generation: int) -> int:
    """The token in a ticket (plain or lent) published for ``generation``."""
    return ticket_word(word, generation)  # the mix is its own inverse


def generation_low31(generation: int) -> int:
    """The bits of ``generation`` that a claim word keeps."""
    return generation & GENERATION_BITS


def generation_at_least(low31: int, floor: int) -> int:
    """The least generation >= ``floor`` whose low 31 bits are ``low31`` (from a word)."""
    return floor + ((low31 - floor) & GENERATION_BITS)


# ------------------------------------------------------------------ tokens

_THREE_WORDS = struct.Struct("<3Q")


def ticket_token(key: int, segment: int, index: int, generation: int) -> int:
    """The token a client with ``key`` puts on the handle of slot ``segment:index``.

    A keyed hash (BLAKE2b) of the slot and the generation the handle names:
    unguessable without ``key`` (which only the client and the manager know),
    never 0, below 2**62, and different for every handoff. Because
    the manager can compute it too, it can check a receiver's claim or
    ``Attach`` before the sender's own notice arrives.
    """
    return token_maker(key)(segment, index, generation)


def token_maker(key: int) -> Callable[[int, int, int], int]:
    """``ticket_token`` with ``key`` bound, keyed once (a third of the cost per call)."""
    keyed = hashlib.blake2b(digest_size=8, key=key.to_bytes(8, "little"))
    pack = _THREE_WORDS.pack
    from_bytes = int.from_bytes

    def token(segment: int, index: int, generation: int) -> int:
        h = keyed.copy()
        h.update(pack(segment, index, generation))
        return (from_bytes(h.digest(), "little") & TICKET_BITS) | 1

    return token


#: Odd 64-bit constants ``seal_token`` multiplies a handle's fields by.
_SEAL_LENGTH = 0xBF58_476D_1CE4_E5B9
_SEAL_CAPACITY = 0x94D0_49BB_1331_11EB
_SEAL_READERS = 0xFF51_AFD7_ED55_8CCD


def seal_token(token: int, length: int, capacity: int, readers: int) -> int:
    """The token a ``Handle`` carries for a handoff under ``token``, sealed with its fields.

    Each of ``length``, ``capacity`` and ``readers`` times its own odd
    constant, XORed into the token (62 bits kept), like ``ticket_word``
    mixes in the generation. The call is its own inverse: a receiver
    unseals ``handle.token`` with the handle's fields and gets the token of
    the handoff back, the one the ticket word and the manager's books hold.
    A handle with one of those fields changed unseals to another token,
    which matches neither, so it is stale. A check against mistakes, not a
    secret: whoever knows this function can reseal a changed field, which
    is why the capacity and the read-only-ness are also checked against the
    record (the receiver's mapping, or the manager's, which ``Attach``
    asks). The C twin is ``_speedups.seal_token``.
    """
    return (
        token ^ length * _SEAL_LENGTH ^ capacity * _SEAL_CAPACITY ^ readers * _SEAL_READERS
    ) & TICKET_BITS
