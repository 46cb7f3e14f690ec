"""The host-side owner of the KV page pool: free list, per-page ref counts and the prefix cache.

Knows page ids, how many owners hold each page, and the chained hash of the token ids of every
registered full page. Does not know requests, slots, positions or the device: callers hand it
token ids and page lists and get page ids back; the device only ever sees page tables built
from these ids.

Every page except the null page 0 is in exactly one state:
  free    ref 0, not registered, on the free list;
  used    ref >= 1 (ref > 1 only for registered pages shared through the prefix cache);
  cached  ref 0 but registered: its K/V stay valid for a later prefix hit, and it is evicted,
          least recently released first, only when a fresh page is needed.
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Iterable, Sequence

NULL_PAGE = 0
ROOT_HASH = hashlib.sha256(b"jaxgen prefix cache root").digest()


def salted_root(salt: str) -> bytes:
    """The first link of a hash chain: `ROOT_HASH` unsalted, else a root of the salt's own.
    Pages registered under one root are never found from another, so requests of different
    salts (tenants, see `SamplingParams.cache_salt`) share no pages even for the same prompt."""
    return ROOT_HASH if not salt else hashlib.sha256(ROOT_HASH + salt.encode("utf-8")).digest()


def chain_hash(parent: bytes, page_token_ids: Sequence[int]) -> bytes:
    """Hash of one full page, chained on the hash of all the pages before it.

    sha256 rather than Python's hash(): pages are a security boundary, and tuple hashes are cheap
    to collide on purpose — a crafted prompt could then be served another user's K/V.
    """
    return hashlib.sha256(parent + array.array("q", page_token_ids).tobytes()).digest()


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: must be >= 2 (page 0 is the null page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._page_by_hash: dict[bytes, int] = {}
        self._hash_by_page: dict[int, bytes] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.prefix_query_tokens = 0  # tokens looked up by match_prefix
        self.prefix_hit_tokens = 0  # of those, tokens served from cached pages

    # -- counters ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered pages nobody holds: reusable by a prefix hit, evictable for allocation."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free) - len(self._evictable)

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    def free_pages(self) -> tuple[int, ...]:
        """Pages on the free list (their K/V belong to nobody; tests poison them)."""
        return tuple(self._free)

    # -- allocation -------------------------------------------------------------------------
    def can_allocate(self, n: int, sharing: Iterable[int] = ()) -> bool:
        """Whether `allocate(n)` would succeed after `sharing` (cached pages about to be taken by
        a prefix hit) stop being evictable."""
        taken = sum(1 for p in set(sharing) if self._refs[p] == 0)
        return n <= self.num_available - taken

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages, each with ref 1, or None (and no change at all) when even evicting
        every cached page would not be enough: the caller then preempts someone."""
        if n < 0:
            raise ValueError(f"n={n}: must be >= 0")
        if n > self.num_available:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_by_hash[self._hash_by_page.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page of a sequence's page list (in sequence order).

        Released tail-first, so a sequence's last pages are evicted before its first: a cached
        page is only reachable through the chain of pages before it."""
        for page in reversed(pages):
            if self._refs[page] <= 0 or page == NULL_PAGE:
                raise RuntimeError(f"page {page} freed while not held (double free)")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_by_page:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # -- prefix cache -----------------------------------------------------------------------
    def full_page_hashes(self, token_ids: Sequence[int], known: Sequence[bytes] = (),
                         root: bytes = ROOT_HASH) -> list[bytes]:
        """Chain hashes of a sequence's full pages: `known` (the hashes of its first pages,
        computed before) extended by the full pages of `token_ids`, the tokens that follow;
        `root`: the chain's first link (`salted_root`)."""
        hashes = list(known)
        parent = hashes[-1] if hashes else root
        ps = self.page_size
        for i in range(len(token_ids) // ps):
            parent = chain_hash(parent, token_ids[i * ps:(i + 1) * ps])
            hashes.append(parent)
        return hashes

    def lookup_prefix(self, token_ids: Sequence[int], root: bytes = ROOT_HASH) -> list[int]:
        """The longest run of cached full pages holding a prefix of `token_ids`, registered under
        `root`. No side effects."""
        pages, parent, ps = [], root, self.page_size
        for i in range(len(token_ids) // ps):
            parent = chain_hash(parent, token_ids[i * ps:(i + 1) * ps])
            page = self._page_by_hash.get(parent)
            if page is None:
                break
            pages.append(page)
        return pages

    def match_prefix(self, token_ids: Sequence[int], root: bytes = ROOT_HASH) -> list[int]:
        """`lookup_prefix`, taking a reference on each page found (and counting the lookup)."""
        pages = self.lookup_prefix(token_ids, root)
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += len(pages) * self.page_size
        return pages

    def register_full_pages(self, token_ids: Sequence[int], pages: Sequence[int],
                            known: Sequence[bytes] = (), root: bytes = ROOT_HASH) -> list[bytes]:
        """Make the full pages of a sequence (tokens whose K/V are written in `pages`, its whole
        page list) findable by later prefix lookups. Idempotent. To extend a registration
        cheaply, pass as `known` the hashes this call returned last time and as `token_ids` only
        the tokens after them; with no `known`, `token_ids` is the whole sequence. `root`: as
        the sequence's lookups use.

        When another page already holds the same prefix, that one stays the cached copy and this
        page stays unregistered (it goes back to the free list when released)."""
        hashes = self.full_page_hashes(token_ids, known, root)
        if len(hashes) > len(pages):
            raise ValueError(f"the tokens fill {len(hashes)} pages, but only {len(pages)} pages "
                             f"were given")
        for i in range(len(known), len(hashes)):
            page, digest = pages[i], hashes[i]
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} registered while not held")
            held = self._hash_by_page.get(page)
            if held is not None:
                if held != digest:
                    raise RuntimeError(f"page {page} is registered for a different prefix")
            elif digest not in self._page_by_hash:
                self._page_by_hash[digest] = page
                self._hash_by_page[page] = digest
        return hashes

    # -- checking ---------------------------------------------------------------------------
    def check_invariants(self, owned: Iterable[Sequence[int]]) -> None:
        """Raise AssertionError unless the pool is consistent with `owned`, the page lists of
        every current owner: each page is exactly one of free / used / cached, its ref count is
        the number of owners holding it, and only registered pages are held twice."""

        def fail(message):
            raise AssertionError(f"page allocator: {message}")

        holders = collections.Counter()
        for pages in owned:
            if len(set(pages)) != len(pages):
                fail(f"an owner holds a page twice: {list(pages)}")
            holders.update(pages)
        free = set(self._free)
        if len(free) != len(self._free):
            fail("a page is on the free list twice")
        if NULL_PAGE in holders or NULL_PAGE in free or NULL_PAGE in self._hash_by_page:
            fail("the null page was handed out")
        if any(not 0 < p < self.num_pages for p in holders):
            fail(f"an owner holds a page outside [1, {self.num_pages})")
        for page in range(1, self.num_pages):
            ref = self._refs[page]
            states = (page in free) + (ref > 0) + (page in self._evictable)
            if states != 1:
                fail(f"page {page} is in {states} states (free/used/cached)")
            if ref != holders[page]:
                fail(f"page {page} has ref count {ref} but {holders[page]} owners")
            registered = page in self._hash_by_page
            if (page in self._evictable and not registered) or (page in free and registered):
                fail(f"page {page}: cached pages must be registered, free pages must not")
            if ref > 1 and not registered:
                fail(f"page {page} is shared by {ref} owners but not through the prefix cache")
        if {p: h for h, p in self._page_by_hash.items()} != self._hash_by_page:
            fail("hash -> page and page -> hash maps disagree")
