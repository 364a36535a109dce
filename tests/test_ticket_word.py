"""The ticket word (``shmpool.ticket``): its encodings round-trip, and C agrees.

The Python properties run in both modes; the parity tests need the C
extension and skip without it (``SHMPOOL_NO_SPEEDUPS=1``, or not built).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shmpool import protocol, ticket
from shmpool._native import speedups as C
from shmpool.ticket import (
    ANY_CLAIM,
    ANY_LENT,
    CLAIMED,
    CLIENT_BITS,
    GENERATION_BITS,
    LENT,
    TICKET_BITS,
    claim_word,
    claimer_of,
    claims_by,
    generation_at_least,
    generation_low31,
    is_claim_for,
    is_claimed,
    is_lent,
    is_returned,
    is_ticket,
    lent_word,
    returned_word,
    seal_token,
    ticket_token,
    ticket_word,
    token_of,
    word_low31,
)

needs_c = pytest.mark.skipif(C is None, reason="the C extension is off or not built")

U64 = (1 << 64) - 1
MAX_ID = (1 << 63) - 1
#: Every value with one bit set, then every value with one bit clear: a mask
#: or a shift that is off by a bit gives one of them away.
ONE_BIT = [1 << b for b in range(64)]
ONE_HOLE = [U64 ^ bit for bit in ONE_BIT]


def _bits(n: int) -> st.SearchStrategy[int]:
    """Values below ``2**n`` with one bit set."""
    return st.integers(0, n - 1).map(lambda b: 1 << b)


u64s = st.one_of(st.integers(0, U64), _bits(64))
generations = st.integers(0, MAX_ID)
client_ids = st.integers(1, CLIENT_BITS)
tokens = st.integers(1, TICKET_BITS)
EDGES = [0, 1, GENERATION_BITS, CLIENT_BITS, TICKET_BITS, LENT, CLAIMED, CLAIMED | LENT, U64]
#: Every kind of word, not only the ones the encodings make.
words = st.one_of(
    u64s,
    st.sampled_from(EDGES),
    _bits(63).map(lambda bit: CLAIMED | bit),
    st.builds(claim_word, client_ids, generations),
    st.builds(claim_word, _bits(32), _bits(63)),
    st.builds(returned_word, generations),
    st.builds(ticket_word, tokens, generations),
    st.builds(lent_word, tokens, generations),
)


def _matches(word: int, pattern: tuple[int, int]) -> bool:
    mask, value = pattern
    return word & mask == value


# ------------------------------------------------------- the Python encodings


def test_the_layout_is_the_one_drawn() -> None:
    assert CLAIMED == 1 << 63 and LENT == 1 << 62
    assert TICKET_BITS == LENT - 1 and CLIENT_BITS == (1 << 32) - 1
    assert GENERATION_BITS << 32 | CLIENT_BITS | CLAIMED == U64  # a claim fills the word
    assert claim_word(0xABCD, 5) == 1 << 63 | 5 << 32 | 0xABCD
    assert returned_word(GENERATION_BITS + 2) == 1 << 63 | 1 << 32
    assert lent_word(1, 0) == 1 << 62 | 1 and ticket_word(1, 0) == 1


@given(client_ids, generations)
def test_a_claim_carries_its_client_and_generation(client: int, generation: int) -> None:
    word = claim_word(client, generation)
    assert 0 <= word <= U64
    assert claimer_of(word) == client
    assert word_low31(word) == generation_low31(generation) == generation % (1 << 31)
    assert is_claimed(word) and _matches(word, ANY_CLAIM)
    assert not is_ticket(word) and not is_lent(word) and not _matches(word, ANY_LENT)
    assert not is_returned(word)  # client 0 is no client
    assert is_claim_for(word, generation)
    assert not is_claim_for(word, generation + 1)  # its low 31 bits differ
    assert _matches(word, claims_by(client))
    assert not _matches(word, claims_by(client % CLIENT_BITS + 1))


@given(generations, st.integers(0, GENERATION_BITS))
def test_a_returned_word_is_a_claim_by_nobody_and_gives_the_generation_back(
    generation: int, behind: int
) -> None:
    word = returned_word(generation)
    assert word == claim_word(0, generation)
    assert is_returned(word) and is_claimed(word) and claimer_of(word) == 0
    assert not is_ticket(word) and not is_lent(word)
    assert is_claim_for(word, generation)
    floor = max(0, generation - behind)  # the books are behind by less than 2**31
    assert generation_at_least(word_low31(word), floor) == generation


@given(tokens, generations)
def test_a_ticket_gives_its_token_back_only_for_its_generation(token: int, generation: int) -> None:
    word = ticket_word(token, generation)
    lent = lent_word(token, generation)
    assert lent == word | LENT and lent != word
    assert token_of(word, generation) == token == token_of(lent, generation)
    assert token_of(word, generation + 1) != token  # a changed generation: stale
    assert not is_claimed(word) and not is_claimed(lent)
    assert not is_returned(word) and not is_returned(lent)
    assert is_lent(lent) and _matches(lent, ANY_LENT)
    assert not is_lent(word) and not _matches(word, ANY_LENT)
    assert is_ticket(lent)
    assert is_ticket(word) == (word != 0)  # 0 is "nothing published", whatever made it
    assert not _matches(word, claims_by(claimer_of(word) or 1))


@given(tokens, tokens, st.integers(0, TICKET_BITS), st.integers(0, TICKET_BITS))
def test_tickets_differ_for_every_token_and_generation(t1: int, t2: int, g1: int, g2: int) -> None:
    """The mix is one-to-one in each argument (below 2**62), so no two handoffs share a word."""
    assert (ticket_word(t1, g1) == ticket_word(t2, g1)) == (t1 == t2)
    assert (ticket_word(t1, g1) == ticket_word(t1, g2)) == (g1 == g2)


@given(words)
@example(0)
@example(U64)
def test_every_word_is_exactly_one_kind(word: int) -> None:
    """Nothing, a plain ticket, a lender's ticket, or a claim (a return is a claim by 0)."""
    plain = is_ticket(word) and not is_lent(word)
    kinds = [word == 0, plain, is_lent(word), is_claimed(word)]
    assert kinds.count(True) == 1, (hex(word), kinds)
    assert is_returned(word) == (is_claimed(word) and claimer_of(word) == 0)
    assert _matches(word, ANY_CLAIM) == is_claimed(word)
    assert _matches(word, ANY_LENT) == is_lent(word)
    for client in (1, claimer_of(word) or 1):
        by = is_claimed(word) and claimer_of(word) == client
        assert _matches(word, claims_by(client)) == by
    if is_claimed(word):
        low = word_low31(word)
        assert word == claim_word(claimer_of(word), low)  # a claim is its fields, no more
        assert is_claim_for(word, low) and is_claim_for(word, low + (1 << 31))
        assert not is_claim_for(word, low + 1)
    else:
        assert not is_claim_for(word, 0) and not is_claim_for(word, 1)


@given(st.integers(0, GENERATION_BITS), generations)
def test_generation_at_least_is_the_next_with_those_low_bits(low: int, floor: int) -> None:
    generation = generation_at_least(low, floor)
    assert floor <= generation < floor + (1 << 31)
    assert generation_low31(generation) == low


@given(st.integers(0, U64), st.integers(0, MAX_ID), st.integers(0, 2**16), generations)
def test_ticket_tokens_fit_a_ticket_and_round_trip(
    key: int, segment: int, index: int, generation: int
) -> None:
    token = ticket_token(key, segment, index, generation)
    assert 1 <= token <= TICKET_BITS and token & 1  # never 0, never beyond a ticket's bits
    assert token_of(ticket_word(token, generation), generation) == token
    assert token_of(lent_word(token, generation), generation) == token


@given(tokens, u64s, u64s, u64s)
def test_seal_token_is_its_own_inverse(
    token: int, length: int, capacity: int, readers: int
) -> None:
    sealed = seal_token(token, length, capacity, readers)
    assert 0 <= sealed <= TICKET_BITS
    assert seal_token(sealed, length, capacity, readers) == token
    assert seal_token(sealed, length + 1, capacity, readers) != token


def test_protocol_re_exports_the_word_from_ticket() -> None:
    """One definition: protocol's names are ticket's objects, and protocol defines none."""
    names = [
        "CLAIMED",
        "LENT",
        "claim_word",
        "claimer_of",
        "generation_at_least",
        "is_returned",
        "lent_word",
        "returned_word",
        "seal_token",
        "ticket_token",
        "ticket_word",
        "token_maker",
    ]
    for name in names:
        assert name in protocol.__all__, name
        assert getattr(protocol, name) is getattr(ticket, name), name
        if callable(getattr(ticket, name)):
            assert getattr(protocol, name).__module__ == "shmpool.ticket", name
    for name in ticket.__all__:
        assert hasattr(ticket, name), name


# --------------------------------------------------------- C against Python

PARITY = settings(max_examples=1000, deadline=None)


@needs_c
@PARITY
@given(u64s, u64s)
@example(0, 0)
@example(U64, U64)
@example(TICKET_BITS, 1)
def test_c_ticket_and_lent_words_are_pythons(token: int, generation: int) -> None:
    assert C is not None
    assert C.ticket_word(token, generation) == ticket_word(token, generation)
    assert C.lent_word(token, generation) == lent_word(token, generation)


@needs_c
@PARITY
@given(u64s, u64s)
@example(0, 0)
@example(U64, U64)
@example(CLIENT_BITS + 1, GENERATION_BITS + 1)
def test_c_claim_and_returned_words_are_pythons(client: int, generation: int) -> None:
    assert C is not None
    assert C.claim_word(client, generation) == claim_word(client, generation)
    assert C.returned_word(generation) == returned_word(generation)


@needs_c
@PARITY
@given(words)
@example(0)
@example(U64)
@example(CLAIMED)
@example(CLAIMED | 1)
@example(LENT)
def test_c_reads_words_as_python_does(word: int) -> None:
    assert C is not None
    assert C.is_returned(word) is is_returned(word)
    assert C.word_low31(word) == word_low31(word)


@needs_c
@PARITY
@given(st.integers(0, GENERATION_BITS), generations)
@example(0, 0)
@example(GENERATION_BITS, MAX_ID)
@example(0, GENERATION_BITS)
def test_c_generation_at_least_is_pythons(low: int, floor: int) -> None:
    assert C is not None
    assert C.generation_at_least(low, floor) == generation_at_least(low, floor)


@needs_c
@PARITY
@given(u64s, u64s, u64s, u64s)
def test_c_seal_token_is_pythons(token: int, length: int, capacity: int, readers: int) -> None:
    assert C is not None
    assert C.seal_token(token, length, capacity, readers) == seal_token(
        token, length, capacity, readers
    )


@needs_c
def test_c_and_python_agree_bit_by_bit() -> None:
    """Every one-bit and one-hole value, in every argument of every twin."""
    assert C is not None
    values = [0, *ONE_BIT, *ONE_HOLE]
    for word in values:
        for extra in (0, CLAIMED):
            assert C.is_returned(word | extra) is is_returned(word | extra), hex(word)
            assert C.word_low31(word | extra) == word_low31(word | extra), hex(word)
    for a in values:
        for b in values:
            assert C.ticket_word(a, b) == ticket_word(a, b), (hex(a), hex(b))
            assert C.lent_word(a, b) == lent_word(a, b), (hex(a), hex(b))
            assert C.claim_word(a, b) == claim_word(a, b), (hex(a), hex(b))
        assert C.returned_word(a) == returned_word(a), hex(a)
        for floor in (0, 1, GENERATION_BITS, 1 << 31, MAX_ID - (1 << 31), a & MAX_ID):
            low = a & GENERATION_BITS
            assert C.generation_at_least(low, floor) == generation_at_least(low, floor)


@needs_c
def test_c_has_a_twin_of_every_word_function_it_uses() -> None:
    """The names the C file's hot paths use, each callable from Python for these tests."""
    assert C is not None
    for name in (
        "ticket_word",
        "lent_word",
        "claim_word",
        "returned_word",
        "is_returned",
        "word_low31",
        "generation_at_least",
        "seal_token",
    ):
        assert callable(getattr(C, name)), name
        assert callable(getattr(ticket, name)), name
