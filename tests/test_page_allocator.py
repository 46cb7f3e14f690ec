"""PageAllocator: free list, ref counts, the prefix cache and its LRU eviction (no device)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgen.scheduler.page_allocator import NULL_PAGE, PageAllocator

PS = 16


def tokens(n, offset=0):
    return [(offset + i) % 1000 for i in range(n)]


def test_allocate_never_hands_out_the_null_page_and_fails_without_change():
    alloc = PageAllocator(num_pages=5, page_size=PS)
    pages = alloc.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    assert alloc.allocate(1) is None
    alloc.check_invariants([pages])
    alloc.free(pages[:2])
    assert alloc.allocate(3) is None  # all or nothing
    assert alloc.num_free == 2
    alloc.check_invariants([pages[2:]])
    assert alloc.allocate(0) == []


def test_double_free_is_an_error():
    alloc = PageAllocator(num_pages=3, page_size=PS)
    pages = alloc.allocate(1)
    alloc.free(pages)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(pages)


def test_constructor_validation_names_the_field():
    with pytest.raises(ValueError, match="num_pages=1"):
        PageAllocator(num_pages=1, page_size=PS)


def test_prefix_match_shares_registered_full_pages_only():
    alloc = PageAllocator(num_pages=10, page_size=PS)
    seq = tokens(40)  # 2 full pages + 8 tokens
    pages = alloc.allocate(3)
    hashes = alloc.register_full_pages(seq, pages)
    assert len(hashes) == 2
    assert alloc.register_full_pages(seq[32:], pages, hashes) == hashes  # idempotent
    assert alloc.register_full_pages(seq[:16], pages) == hashes[:1]
    assert alloc.register_full_pages(seq[16:32], pages, hashes[:1]) == hashes  # extended
    assert alloc.register_full_pages(seq, pages) == hashes

    assert alloc.lookup_prefix(tokens(15)) == []  # no full page
    shared = alloc.match_prefix(seq[:33] + [999] * 10)
    assert shared == pages[:2]
    assert alloc.prefix_hit_tokens == 32 and alloc.prefix_query_tokens == 43
    alloc.check_invariants([pages, shared])
    # A different first page breaks the chain even when the second page's tokens agree.
    assert alloc.lookup_prefix([7] + seq[1:]) == []


def test_registered_pages_stay_cached_after_free_and_are_evicted_lru_tail_first():
    alloc = PageAllocator(num_pages=5, page_size=PS)
    a, b = tokens(32), tokens(32, offset=500)
    pa, pb = alloc.allocate(2), alloc.allocate(2)
    alloc.register_full_pages(a, pa)
    alloc.register_full_pages(b, pb)
    alloc.free(pa)
    alloc.free(pb)
    assert alloc.num_free == 0 and alloc.num_cached == 4 and alloc.num_used == 0
    alloc.check_invariants([])
    # The oldest release goes first, and within it the tail page (useless without its head).
    fresh = alloc.allocate(1)
    assert fresh == [pa[1]]
    assert alloc.lookup_prefix(a) == [pa[0]]
    assert alloc.lookup_prefix(b) == pb
    # A cache hit pins the page: it is no longer evictable.
    hit = alloc.match_prefix(b)
    assert not alloc.can_allocate(2)
    assert alloc.allocate(1) == [pa[0]]
    alloc.check_invariants([fresh, hit, [pa[0]]])


def test_can_allocate_counts_pages_a_hit_will_pin():
    alloc = PageAllocator(num_pages=3, page_size=PS)
    seq = tokens(32)
    pages = alloc.allocate(2)
    alloc.register_full_pages(seq, pages)
    alloc.free(pages)
    hit = alloc.lookup_prefix(seq)
    assert hit == pages
    assert alloc.can_allocate(2) and not alloc.can_allocate(1, sharing=hit)
    assert alloc.can_allocate(0, sharing=hit)


def test_a_prefix_already_cached_keeps_its_first_page():
    alloc = PageAllocator(num_pages=5, page_size=PS)
    seq = tokens(16)
    first, second = alloc.allocate(1), alloc.allocate(1)
    alloc.register_full_pages(seq, first)
    alloc.register_full_pages(seq, second)  # computed concurrently: stays unregistered
    alloc.free(second)
    assert alloc.num_free == 3  # went back to the free list, not the cache
    assert alloc.lookup_prefix(seq) == first
    alloc.check_invariants([first])


def test_check_invariants_catches_wrong_owner_counts():
    alloc = PageAllocator(num_pages=4, page_size=PS)
    pages = alloc.allocate(2)
    with pytest.raises(AssertionError, match="ref count"):
        alloc.check_invariants([pages[:1]])
    with pytest.raises(AssertionError, match="ref count 1 but 2 owners"):
        alloc.check_invariants([pages, pages[:1]])
    with pytest.raises(AssertionError, match="twice"):
        alloc.check_invariants([pages + pages[:1]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "register"]),
                          st.integers(0, 6), st.integers(0, 3)), max_size=60))
def test_random_operations_keep_invariants(ops):
    """Owners allocate, share by prefix, register and free at random; every page stays in
    exactly one state with exact ref counts, and freeing everything leaves no page held."""
    alloc = PageAllocator(num_pages=8, page_size=PS)
    stems = [tokens(64, offset=100 * i) for i in range(4)]
    owners = []  # (token ids, pages)
    for op, n, which in ops:
        if op == "alloc":
            seq = stems[which][:16 * n + 3]
            pages = alloc.allocate(len(seq) // PS + 1)
            if pages is not None:
                owners.append((seq, pages))
        elif op == "share":
            seq = stems[which][:16 * n + 3]
            hit = alloc.match_prefix(seq)
            rest = alloc.allocate(len(seq) // PS + 1 - len(hit))
            if rest is None:
                alloc.free(hit)
            else:
                owners.append((seq, hit + rest))
        elif op == "register" and owners:
            seq, pages = owners[n % len(owners)]
            alloc.register_full_pages(seq, pages)
        elif op == "free" and owners:
            alloc.free(owners.pop(n % len(owners))[1])
        alloc.check_invariants([p for _, p in owners])
    for _, pages in owners:
        alloc.free(pages)
    alloc.check_invariants([])
    assert alloc.num_used == 0 and alloc.num_free + alloc.num_cached == 7
