"""Sparse extent bitmap: one bit per block, memory that follows what is set.

Design
------
Bits live in *leaves* of 32768 bits (512 words, 4 KiB).  A leaf exists only
while it holds at least one set bit: it is allocated on the first set and
freed by the clear that empties it.  Leaves hang under a radix tree of
*nodes* with 512 children each; every node carries a 512-bit *summary* (bit i
set <=> child i exists), so finding the next non-empty leaf costs a few
count-trailing-zeros per level instead of a walk over empty space.  The
tree's depth is fixed at creation from ``nbits`` (1 level up to 2**24 bits,
2 up to 2**33, 4 at the 2**48 maximum), so an empty bitmap of any size is one
root node.  Memory is therefore the set leaves plus about 1/500 of that in
nodes, and never more than a flat bitmap plus a small index.

All kernels are plain C functions over ``Tree`` that run without the GIL and
report allocation failure by return code; the ``ExtentBitmap`` wrapper
validates every argument in Python first (nothing is clipped or ignored:
out-of-range raises ``BitmapRangeError``) and raises on a failed return.

Locking: each bitmap has its own lock, taken (with the GIL released) around
every kernel, so one bitmap may be used from several threads.  Binary
operations take both locks in address order.  ``iter_runs`` takes the lock
per batch of runs, so a concurrent change may or may not be seen by an
iterator already running (it never crashes).

On-disk format: see docs/cext-bitmap.md (magic, version, leaf size, nbits,
leaf count, population, then the non-empty leaves in ascending order, then
an xxh3-64 of everything before it).
"""

import os

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.pythread cimport (
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import numpy as np

from cyclemirror.errors import BitmapFormatError, BitmapRangeError
from cyclemirror.fileio import atomic_write

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline int cm_ctz64(uint64_t w) { return __builtin_ctzll(w); }
    static inline int cm_popcount64(uint64_t w) { return __builtin_popcountll(w); }
    static inline void cm_store_le64(unsigned char *p, uint64_t v) {
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    static inline uint64_t cm_load_le64(const unsigned char *p) {
        uint64_t v;
        memcpy(&v, p, 8);
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline void cm_store_le32(unsigned char *p, uint32_t v) {
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        memcpy(p, &v, 4);
    }
    static inline uint32_t cm_load_le32(const unsigned char *p) {
        uint32_t v;
        memcpy(&v, p, 4);
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    """
    int cm_ctz64(uint64_t w) noexcept nogil
    int cm_popcount64(uint64_t w) noexcept nogil
    void cm_store_le64(unsigned char *p, uint64_t v) noexcept nogil
    uint64_t cm_load_le64(const unsigned char *p) noexcept nogil
    void cm_store_le32(unsigned char *p, uint32_t v) noexcept nogil
    uint32_t cm_load_le32(const unsigned char *p) noexcept nogil

cdef extern from "xxhash.h":
    uint64_t XXH3_64bits(const void *data, size_t length) nogil


# ---- geometry ------------------------------------------------------------

cdef enum:
    LEAF_SHIFT = 15                 # 32768 bits (4 KiB) per leaf
    LEAF_BITS = 32768
    LEAF_WORDS = 512
    FAN_SHIFT = 9                   # 512 children per node
    FANOUT = 512
    SUMMARY_WORDS = 8
    MAX_DEPTH = 8                   # 2**48 bits need 4

MAX_NBITS = 1 << 48
LEAF_SIZE_BITS = LEAF_BITS

cdef enum:
    C_FORMAT_VERSION = 1
    C_HEADER_SIZE = 40              # magic 8, version 4, leaf bits 4, nbits 8, leaves 8, population 8
    C_LEAF_RECORD_SIZE = 8 + LEAF_WORDS * 8     # leaf index 8, words
    C_TRAILER_SIZE = 8              # xxh3-64 of everything before it

FORMAT_MAGIC = b"CMBITMAP"
FORMAT_VERSION = C_FORMAT_VERSION
HEADER_SIZE = C_HEADER_SIZE
LEAF_RECORD_SIZE = C_LEAF_RECORD_SIZE
TRAILER_SIZE = C_TRAILER_SIZE

cdef uint64_t ALL_ONES = 0xFFFFFFFFFFFFFFFF


ctypedef struct Leaf:
    uint64_t pop                    # set bits in this leaf; 0 never survives an operation
    uint64_t words[LEAF_WORDS]

ctypedef struct Node:
    uint64_t summary[SUMMARY_WORDS]  # bit i set <=> child[i] != NULL
    void *child[FANOUT]

ctypedef struct Tree:
    uint64_t nbits
    int depth                       # node levels above the leaves (>= 1)
    Node *root
    uint64_t count                  # set bits in the whole bitmap
    uint64_t nleaves
    uint64_t nnodes                 # including the root


# ---- leaf kernels ----------------------------------------------------------

cdef inline uint64_t _first_mask(uint32_t a) noexcept nogil:
    return ALL_ONES << (a & 63)

cdef inline uint64_t _last_mask(uint32_t b) noexcept nogil:
    # mask of the bits of word (b-1)>>6 that are below b
    return ALL_ONES >> (63 - ((b - 1) & 63))


cdef uint64_t _leaf_set(Leaf *lf, uint32_t a, uint32_t b) noexcept nogil:
    """Set bits [a, b) of the leaf (a < b); return how many were newly set."""
    cdef uint32_t wa = a >> 6, wb = (b - 1) >> 6, w
    cdef uint64_t old, mask, added = 0
    if wa == wb:
        mask = _first_mask(a) & _last_mask(b)
        old = lf.words[wa]
        lf.words[wa] = old | mask
        added = cm_popcount64(mask & ~old)
    else:
        old = lf.words[wa]
        lf.words[wa] = old | _first_mask(a)
        added = cm_popcount64(_first_mask(a) & ~old)
        for w in range(wa + 1, wb):
            added += 64 - cm_popcount64(lf.words[w])
            lf.words[w] = ALL_ONES
        old = lf.words[wb]
        lf.words[wb] = old | _last_mask(b)
        added += cm_popcount64(_last_mask(b) & ~old)
    lf.pop += added
    return added


cdef uint64_t _leaf_clear(Leaf *lf, uint32_t a, uint32_t b) noexcept nogil:
    """Clear bits [a, b) of the leaf (a < b); return how many were set before."""
    cdef uint32_t wa = a >> 6, wb = (b - 1) >> 6, w
    cdef uint64_t old, mask, removed = 0
    if wa == wb:
        mask = _first_mask(a) & _last_mask(b)
        old = lf.words[wa]
        lf.words[wa] = old & ~mask
        removed = cm_popcount64(mask & old)
    else:
        old = lf.words[wa]
        lf.words[wa] = old & ~_first_mask(a)
        removed = cm_popcount64(_first_mask(a) & old)
        for w in range(wa + 1, wb):
            removed += cm_popcount64(lf.words[w])
            lf.words[w] = 0
        old = lf.words[wb]
        lf.words[wb] = old & ~_last_mask(b)
        removed += cm_popcount64(_last_mask(b) & old)
    lf.pop -= removed
    return removed


cdef uint64_t _leaf_count(const Leaf *lf, uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t wa = a >> 6, wb = (b - 1) >> 6, w
    cdef uint64_t n
    if a == 0 and b == LEAF_BITS:
        return lf.pop
    if wa == wb:
        return cm_popcount64(lf.words[wa] & _first_mask(a) & _last_mask(b))
    n = cm_popcount64(lf.words[wa] & _first_mask(a))
    for w in range(wa + 1, wb):
        n += cm_popcount64(lf.words[w])
    n += cm_popcount64(lf.words[wb] & _last_mask(b))
    return n


cdef inline uint32_t _leaf_next_set(const Leaf *lf, uint32_t a) noexcept nogil:
    """First set bit >= a in the leaf, or LEAF_BITS."""
    cdef uint32_t w = a >> 6
    cdef uint64_t m = lf.words[w] & _first_mask(a)
    while m == 0:
        w += 1
        if w == LEAF_WORDS:
            return LEAF_BITS
        m = lf.words[w]
    return (w << 6) + <uint32_t>cm_ctz64(m)


cdef inline uint32_t _leaf_next_clear(const Leaf *lf, uint32_t a, uint32_t limit) noexcept nogil:
    """First clear bit in [a, limit) of the leaf, or limit (a < limit <= LEAF_BITS).

    The limit keeps a capped run piece from scanning the rest of a full leaf.
    """
    cdef uint32_t w = a >> 6, last = (limit - 1) >> 6, r
    cdef uint64_t m = ~lf.words[w] & _first_mask(a)
    while m == 0:
        w += 1
        if w > last:
            return limit
        m = ~lf.words[w]
    r = (w << 6) + <uint32_t>cm_ctz64(m)
    return r if r < limit else limit


cdef uint64_t _leaf_recount(Leaf *lf) noexcept nogil:
    cdef uint64_t n = 0
    cdef int w
    for w in range(LEAF_WORDS):
        n += cm_popcount64(lf.words[w])
    lf.pop = n
    return n


# ---- tree kernels ------------------------------------------------------------

cdef inline int _child_index(const Tree *t, int k, uint64_t leaf) noexcept nogil:
    # index, inside the node at depth k (root = 0), of the subtree holding `leaf`
    return <int>((leaf >> (FAN_SHIFT * (t.depth - 1 - k))) & (FANOUT - 1))


cdef int _tree_init(Tree *t, uint64_t nbits) noexcept nogil:
    cdef uint64_t leaves = (nbits + LEAF_BITS - 1) >> LEAF_SHIFT
    cdef uint64_t span = FANOUT
    t.nbits = nbits
    t.depth = 1
    while span < leaves:
        t.depth += 1
        span <<= FAN_SHIFT
    t.count = 0
    t.nleaves = 0
    t.nnodes = 1
    t.root = <Node *>calloc(1, sizeof(Node))
    return 0 if t.root != NULL else -1


cdef void _node_free(Node *n, int levels_below) noexcept nogil:
    # levels_below == 1: children are leaves
    cdef int i
    for i in range(FANOUT):
        if n.child[i] != NULL:
            if levels_below > 1:
                _node_free(<Node *>n.child[i], levels_below - 1)
            else:
                free(n.child[i])
    free(n)


cdef void _tree_free(Tree *t) noexcept nogil:
    if t.root != NULL:
        _node_free(t.root, t.depth)
        t.root = NULL
    t.count = 0
    t.nleaves = 0
    t.nnodes = 0


cdef Leaf *_leaf_get(const Tree *t, uint64_t leaf) noexcept nogil:
    cdef Node *n = t.root
    cdef int k
    for k in range(t.depth - 1):
        n = <Node *>n.child[_child_index(t, k, leaf)]
        if n == NULL:
            return NULL
    return <Leaf *>n.child[leaf & (FANOUT - 1)]


cdef Leaf *_leaf_get_or_create(Tree *t, uint64_t leaf) noexcept nogil:
    """The leaf, allocated (zeroed) if absent; NULL only when out of memory."""
    cdef Node *n = t.root
    cdef Node *c
    cdef Leaf *lf
    cdef int k, i
    for k in range(t.depth - 1):
        i = _child_index(t, k, leaf)
        c = <Node *>n.child[i]
        if c == NULL:
            c = <Node *>calloc(1, sizeof(Node))
            if c == NULL:
                return NULL
            n.child[i] = c
            n.summary[i >> 6] |= (<uint64_t>1) << (i & 63)
            t.nnodes += 1
        n = c
    i = <int>(leaf & (FANOUT - 1))
    lf = <Leaf *>n.child[i]
    if lf == NULL:
        lf = <Leaf *>calloc(1, sizeof(Leaf))
        if lf == NULL:
            return NULL
        n.child[i] = lf
        n.summary[i >> 6] |= (<uint64_t>1) << (i & 63)
        t.nleaves += 1
    return lf


cdef inline bint _summary_empty(const Node *n) noexcept nogil:
    cdef int w
    for w in range(SUMMARY_WORDS):
        if n.summary[w] != 0:
            return False
    return True


cdef void _leaf_remove(Tree *t, uint64_t leaf) noexcept nogil:
    """Free the leaf and every node that it leaves empty (never the root)."""
    cdef Node *path[MAX_DEPTH]
    cdef int idx[MAX_DEPTH]
    cdef int k, i
    cdef Node *n = t.root
    for k in range(t.depth):
        path[k] = n
        idx[k] = _child_index(t, k, leaf)
        if k < t.depth - 1:
            n = <Node *>n.child[idx[k]]
            if n == NULL:
                return
    n = path[t.depth - 1]
    i = idx[t.depth - 1]
    if n.child[i] == NULL:
        return
    free(n.child[i])
    n.child[i] = NULL
    n.summary[i >> 6] &= ~((<uint64_t>1) << (i & 63))
    t.nleaves -= 1
    k = t.depth - 1
    while k > 0 and _summary_empty(path[k]):
        free(path[k])
        t.nnodes -= 1
        i = idx[k - 1]
        path[k - 1].child[i] = NULL
        path[k - 1].summary[i >> 6] &= ~((<uint64_t>1) << (i & 63))
        k -= 1


cdef int _summary_next(const Node *n, int i) noexcept nogil:
    """First child index >= i that exists, or FANOUT."""
    cdef int w
    cdef uint64_t m
    if i >= FANOUT:
        return FANOUT
    w = i >> 6
    m = n.summary[w] & (ALL_ONES << (i & 63))
    while m == 0:
        w += 1
        if w == SUMMARY_WORDS:
            return FANOUT
        m = n.summary[w]
    return (w << 6) + cm_ctz64(m)


cdef int64_t _node_next_leaf(const Tree *t, const Node *n, int k, uint64_t base,
                             uint64_t leaf, Leaf **out) noexcept nogil:
    # n sits at depth k and covers leaves from `base`; find the first existing leaf >= `leaf`
    cdef int shift = FAN_SHIFT * (t.depth - 1 - k)
    cdef int i = <int>((leaf - base) >> shift) if leaf > base else 0
    cdef uint64_t cbase
    cdef int64_t r
    while True:
        i = _summary_next(n, i)
        if i >= FANOUT:
            return -1
        cbase = base + ((<uint64_t>i) << shift)
        if k == t.depth - 1:
            out[0] = <Leaf *>n.child[i]
            return <int64_t>cbase
        r = _node_next_leaf(t, <Node *>n.child[i], k + 1, cbase,
                            leaf if leaf > cbase else cbase, out)
        if r >= 0:
            return r
        i += 1


cdef int64_t _next_leaf(const Tree *t, uint64_t leaf, Leaf **out) noexcept nogil:
    """Index of the first existing leaf >= `leaf` (and the leaf in *out), or -1."""
    if leaf >= ((<uint64_t>1) << (FAN_SHIFT * t.depth)):
        return -1
    return _node_next_leaf(t, t.root, 0, 0, leaf, out)


cdef int _tree_set_range(Tree *t, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t pos = start, leaf, base, stop_in_leaf
    cdef Leaf *lf
    while pos < end:
        leaf = pos >> LEAF_SHIFT
        base = leaf << LEAF_SHIFT
        stop_in_leaf = end - base if end - base < LEAF_BITS else LEAF_BITS
        lf = _leaf_get_or_create(t, leaf)
        if lf == NULL:
            return -1
        t.count += _leaf_set(lf, <uint32_t>(pos - base), <uint32_t>stop_in_leaf)
        pos = base + stop_in_leaf
    return 0


cdef void _tree_clear_range(Tree *t, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t pos = start, base, stop_in_leaf
    cdef int64_t leaf
    cdef Leaf *lf = NULL
    while pos < end:
        leaf = _next_leaf(t, pos >> LEAF_SHIFT, &lf)
        if leaf < 0:
            return
        base = (<uint64_t>leaf) << LEAF_SHIFT
        if base >= end:
            return
        if base > pos:
            pos = base
        stop_in_leaf = end - base if end - base < LEAF_BITS else LEAF_BITS
        t.count -= _leaf_clear(lf, <uint32_t>(pos - base), <uint32_t>stop_in_leaf)
        if lf.pop == 0:
            _leaf_remove(t, <uint64_t>leaf)
        pos = base + stop_in_leaf


cdef uint64_t _tree_count_range(const Tree *t, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t pos = start, base, stop_in_leaf, n = 0
    cdef int64_t leaf
    cdef Leaf *lf = NULL
    while pos < end:
        leaf = _next_leaf(t, pos >> LEAF_SHIFT, &lf)
        if leaf < 0:
            break
        base = (<uint64_t>leaf) << LEAF_SHIFT
        if base >= end:
            break
        if base > pos:
            pos = base
        stop_in_leaf = end - base if end - base < LEAF_BITS else LEAF_BITS
        n += _leaf_count(lf, <uint32_t>(pos - base), <uint32_t>stop_in_leaf)
        pos = base + stop_in_leaf
    return n


cdef uint64_t _tree_next_set(const Tree *t, uint64_t pos, uint64_t stop) noexcept nogil:
    """First set bit in [pos, stop), or stop."""
    cdef int64_t leaf
    cdef uint64_t base
    cdef uint32_t r
    cdef Leaf *lf = NULL
    while pos < stop:
        leaf = _next_leaf(t, pos >> LEAF_SHIFT, &lf)
        if leaf < 0:
            return stop
        base = (<uint64_t>leaf) << LEAF_SHIFT
        if base > pos:
            pos = base
        r = _leaf_next_set(lf, <uint32_t>(pos - base))
        if r < LEAF_BITS:
            return base + r if base + r < stop else stop
        pos = base + LEAF_BITS
    return stop


cdef uint64_t _tree_next_clear(const Tree *t, uint64_t pos, uint64_t stop) noexcept nogil:
    """First clear bit in [pos, stop), or stop."""
    cdef uint64_t leaf, base
    cdef uint32_t r, limit
    cdef Leaf *lf
    while pos < stop:
        leaf = pos >> LEAF_SHIFT
        base = leaf << LEAF_SHIFT
        lf = _leaf_get(t, leaf)
        if lf == NULL:
            return pos
        limit = <uint32_t>(stop - base) if stop - base < LEAF_BITS else LEAF_BITS
        r = _leaf_next_clear(lf, <uint32_t>(pos - base), limit)
        if r < limit:
            return base + r
        pos = base + limit
    return stop


cdef size_t _tree_runs(const Tree *t, uint64_t *pos, uint64_t stop, uint64_t max_run,
                       int64_t *out, size_t cap) noexcept nogil:
    """Write up to `cap` (start, length) pairs of set runs in [*pos, stop) to `out`.

    Runs longer than max_run (0 = no cap) are cut into max_run pieces counted
    from the run's start (or from *pos if the run began earlier); *pos moves
    past the last piece written, so the next call continues exactly there.
    The current leaf is kept between runs, so the tree is walked once per
    leaf, not once per run.
    """
    cdef size_t n = 0
    cdef uint64_t p = pos[0], base = 0, s, e, lim
    cdef uint64_t cur = ALL_ONES           # index of the leaf `lf` (none yet)
    cdef uint64_t y
    cdef int64_t found
    cdef uint32_t off, limit
    cdef Leaf *lf = NULL
    cdef Leaf *nxt
    while n < cap and p < stop:
        if (p >> LEAF_SHIFT) != cur:
            found = _next_leaf(t, p >> LEAF_SHIFT, &lf)
            if found < 0:
                p = stop
                break
            cur = <uint64_t>found
            base = cur << LEAF_SHIFT
            if base > p:
                p = base
            if p >= stop:
                p = stop
                break
        off = _leaf_next_set(lf, <uint32_t>(p - base))
        if off == LEAF_BITS:
            p = base + LEAF_BITS
            continue
        s = base + off
        if s >= stop:
            p = stop
            break
        lim = stop
        if max_run != 0 and stop - s > max_run:
            lim = s + max_run
        # fast path (most runs of a scattered bitmap): the run ends inside its first word
        y = ~lf.words[off >> 6] & (ALL_ONES << (off & 63))
        if y != 0:
            e = base + ((off >> 6) << 6) + <uint64_t>cm_ctz64(y)
            if e > lim:
                e = lim
            out[2 * n] = <int64_t>s
            out[2 * n + 1] = <int64_t>(e - s)
            n += 1
            p = e
            continue
        # the run's end: scan this leaf, then step into the adjacent leaf while the run goes on
        e = s
        while True:
            limit = <uint32_t>(lim - base) if lim - base < LEAF_BITS else LEAF_BITS
            off = _leaf_next_clear(lf, <uint32_t>(e - base), limit)
            e = base + off
            if off < LEAF_BITS or e >= lim:
                break
            nxt = _leaf_get(t, cur + 1)
            if nxt == NULL:
                break
            cur += 1
            base = cur << LEAF_SHIFT
            lf = nxt
        out[2 * n] = <int64_t>s
        out[2 * n + 1] = <int64_t>(e - s)
        n += 1
        p = e
    pos[0] = p if p < stop else stop
    return n


cdef int _tree_union(Tree *dst, const Tree *src) noexcept nogil:
    cdef int64_t leaf = 0
    cdef Leaf *s = NULL
    cdef Leaf *d
    cdef uint64_t old, w
    cdef int i
    while True:
        leaf = _next_leaf(src, <uint64_t>leaf, &s)
        if leaf < 0:
            return 0
        d = _leaf_get_or_create(dst, <uint64_t>leaf)
        if d == NULL:
            return -1
        old = d.pop
        for i in range(LEAF_WORDS):
            d.words[i] |= s.words[i]
        w = _leaf_recount(d)
        dst.count += w - old
        leaf += 1


cdef void _tree_difference(Tree *dst, const Tree *src) noexcept nogil:
    cdef int64_t leaf = 0
    cdef Leaf *s = NULL
    cdef Leaf *d
    cdef uint64_t old
    cdef int i
    while True:
        leaf = _next_leaf(src, <uint64_t>leaf, &s)
        if leaf < 0:
            return
        d = _leaf_get(dst, <uint64_t>leaf)
        if d != NULL:
            old = d.pop
            for i in range(LEAF_WORDS):
                d.words[i] &= ~s.words[i]
            dst.count -= old - _leaf_recount(d)
            if d.pop == 0:
                _leaf_remove(dst, <uint64_t>leaf)
        leaf += 1


cdef void _tree_intersection(Tree *dst, const Tree *src) noexcept nogil:
    cdef int64_t leaf = 0
    cdef Leaf *s
    cdef Leaf *d = NULL
    cdef uint64_t old
    cdef int i
    while True:
        leaf = _next_leaf(dst, <uint64_t>leaf, &d)
        if leaf < 0:
            return
        s = _leaf_get(src, <uint64_t>leaf)
        old = d.pop
        if s == NULL:
            dst.count -= old
            _leaf_remove(dst, <uint64_t>leaf)
        else:
            for i in range(LEAF_WORDS):
                d.words[i] &= s.words[i]
            dst.count -= old - _leaf_recount(d)
            if d.pop == 0:
                _leaf_remove(dst, <uint64_t>leaf)
        leaf += 1


cdef bint _tree_equal(const Tree *a, const Tree *b) noexcept nogil:
    cdef int64_t leaf = 0
    cdef Leaf *la = NULL
    cdef Leaf *lb
    if a.nbits != b.nbits or a.count != b.count or a.nleaves != b.nleaves:
        return False
    while True:
        leaf = _next_leaf(a, <uint64_t>leaf, &la)
        if leaf < 0:
            return True
        lb = _leaf_get(b, <uint64_t>leaf)
        if lb == NULL or memcmp(la.words, lb.words, sizeof(la.words)) != 0:
            return False
        leaf += 1


# ---- locking -------------------------------------------------------------------

cdef inline void _lock2(PyThread_type_lock a, PyThread_type_lock b) noexcept nogil:
    # both locks in address order, so a.union_update(b) and b.union_update(a) cannot deadlock
    if a == b:
        PyThread_acquire_lock(a, WAIT_LOCK)
    elif <uintptr_t>a < <uintptr_t>b:
        PyThread_acquire_lock(a, WAIT_LOCK)
        PyThread_acquire_lock(b, WAIT_LOCK)
    else:
        PyThread_acquire_lock(b, WAIT_LOCK)
        PyThread_acquire_lock(a, WAIT_LOCK)


cdef inline void _unlock2(PyThread_type_lock a, PyThread_type_lock b) noexcept nogil:
    PyThread_release_lock(a)
    if a != b:
        PyThread_release_lock(b)


def _index(name, value):
    try:
        return value.__index__()
    except AttributeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


# ---- the Python class --------------------------------------------------------------

@cython.final
cdef class ExtentBitmap:
    """One bit per block; sparse (memory follows the set bits); thread-safe.

    ``ExtentBitmap(nbits)`` with ``0 <= nbits <= 2**48``.  Every range is
    ``(start, count)`` in bits, and must lie inside ``[0, nbits)``; anything
    else raises ``BitmapRangeError`` and changes nothing.
    """

    cdef Tree _t
    cdef PyThread_type_lock _lock

    def __cinit__(self, nbits, *args, **kwargs):
        self._t.root = NULL
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("ExtentBitmap: cannot allocate its lock")

    def __init__(self, nbits):
        nbits = _index("nbits", nbits)
        if nbits < 0 or nbits > MAX_NBITS:
            raise BitmapRangeError(
                f"ExtentBitmap(nbits={nbits}): nbits must be in [0, 2**48]; "
                "use a larger block size for bigger volumes")
        if self._t.root != NULL:
            raise TypeError("ExtentBitmap.__init__ called twice")
        if _tree_init(&self._t, <uint64_t>nbits) != 0:
            raise MemoryError(f"ExtentBitmap(nbits={nbits}): out of memory for the root node")

    def __dealloc__(self):
        _tree_free(&self._t)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    # -- validation (Python level: exact integers, no overflow, nothing clipped)

    cdef _check_range(self, str op, start, count):
        start = _index("start", start)
        count = _index("count", count)
        if start < 0 or count < 0 or start + count > self._t.nbits:
            raise BitmapRangeError(
                f"ExtentBitmap.{op}(start={start}, count={count}): range "
                f"[{start}, {start + count}) is outside the bitmap's [0, {self._t.nbits}); "
                "nothing was changed; pass a range inside the bitmap")
        return start, count

    cdef _check_span(self, str op, start, stop, max_run):
        start = _index("start", start)
        stop = self._t.nbits if stop is None else _index("stop", stop)
        max_run = _index("max_run", max_run)
        if start < 0 or stop < start or stop > self._t.nbits:
            raise BitmapRangeError(
                f"ExtentBitmap.{op}(start={start}, stop={stop}): need "
                f"0 <= start <= stop <= nbits={self._t.nbits}; pass a span inside the bitmap")
        if max_run < 0:
            raise BitmapRangeError(
                f"ExtentBitmap.{op}(max_run={max_run}): max_run must be >= 0 (0 = no cap)")
        return start, stop, max_run

    cdef _check_other(self, str op, other):
        if not isinstance(other, ExtentBitmap):
            raise TypeError(f"ExtentBitmap.{op}() needs an ExtentBitmap, not {type(other).__name__}")
        if (<ExtentBitmap>other)._t.nbits != self._t.nbits:
            raise BitmapRangeError(
                f"ExtentBitmap.{op}(): bitmaps of {self._t.nbits} and "
                f"{(<ExtentBitmap>other)._t.nbits} bits cannot be combined; "
                "both must cover the same volume")

    # -- properties

    @property
    def nbits(self):
        return self._t.nbits

    def __repr__(self):
        return f"<ExtentBitmap nbits={self._t.nbits} count={self._t.count}>"

    # -- single ranges

    def set_range(self, start, count):
        """Set bits [start, start+count)."""
        start, count = self._check_range("set_range", start, count)
        cdef uint64_t s = start, e = start + count
        cdef int rc
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            rc = _tree_set_range(&self._t, s, e)
            PyThread_release_lock(self._lock)
        if rc != 0:
            raise MemoryError(
                f"ExtentBitmap.set_range(start={start}, count={count}): out of memory; "
                "the range may be partly set")

    def clear_range(self, start, count):
        """Clear bits [start, start+count); leaves that become empty are freed."""
        start, count = self._check_range("clear_range", start, count)
        cdef uint64_t s = start, e = start + count
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            _tree_clear_range(&self._t, s, e)
            PyThread_release_lock(self._lock)

    def test(self, bit):
        """True if the bit is set."""
        bit = _index("bit", bit)
        if bit < 0 or bit >= self._t.nbits:
            raise BitmapRangeError(
                f"ExtentBitmap.test(bit={bit}): bit is outside the bitmap's [0, {self._t.nbits})")
        cdef uint64_t b = bit
        cdef Leaf *lf
        cdef bint r
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            lf = _leaf_get(&self._t, b >> LEAF_SHIFT)
            r = False
            if lf != NULL:
                r = (lf.words[(b & (LEAF_BITS - 1)) >> 6] >> (b & 63)) & 1
            PyThread_release_lock(self._lock)
        return r

    def any_in_range(self, start, count):
        """True if any bit in [start, start+count) is set."""
        start, count = self._check_range("any_in_range", start, count)
        cdef uint64_t s = start, e = start + count, r
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            r = _tree_next_set(&self._t, s, e)
            PyThread_release_lock(self._lock)
        return r < e

    def count(self):
        """Number of set bits (kept up to date, O(1))."""
        return self._t.count

    def count_range(self, start, count):
        """Number of set bits in [start, start+count)."""
        start, count = self._check_range("count_range", start, count)
        cdef uint64_t s = start, e = start + count, r
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            r = _tree_count_range(&self._t, s, e)
            PyThread_release_lock(self._lock)
        return r

    def is_empty(self):
        return self._t.count == 0

    def memory_bytes(self):
        """Bytes held by this bitmap's leaves and nodes (malloc overhead excluded)."""
        return self._t.nleaves * sizeof(Leaf) + self._t.nnodes * sizeof(Node) + sizeof(Tree)

    # -- runs

    def iter_runs(self, start=0, stop=None, max_run=0):
        """Yield (start, length) of set runs in ascending order, cut to [start, stop).

        With max_run > 0 no yielded run is longer than max_run (longer runs
        are split).  Runs are produced in batches under the lock.
        """
        start, stop, max_run = self._check_span("iter_runs", start, stop, max_run)
        return _RunIterator(self, start, stop, max_run)

    def runs(self, start=0, stop=None, max_run=0):
        """Like iter_runs, as a numpy int64 array of shape (n, 2)."""
        start, stop, max_run = self._check_span("runs", start, stop, max_run)
        cdef uint64_t pos = start, end = stop, cap_run = max_run
        cdef size_t n = 0, cap = 4096, got
        cdef int64_t *buf = <int64_t *>malloc(cap * 2 * sizeof(int64_t))
        cdef int64_t *grown
        cdef bint oom = False
        if buf == NULL:
            raise MemoryError("ExtentBitmap.runs(): out of memory")
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            while True:
                got = _tree_runs(&self._t, &pos, end, cap_run, buf + 2 * n, cap - n)
                n += got
                if n < cap:
                    break
                grown = <int64_t *>realloc(buf, cap * 4 * sizeof(int64_t))
                if grown == NULL:
                    oom = True
                    break
                buf = grown
                cap *= 2
            PyThread_release_lock(self._lock)
        if oom:
            free(buf)
            raise MemoryError("ExtentBitmap.runs(): out of memory; use iter_runs()")
        # filled through a typed memoryview, not numpy's C API: the C then
        # needs no numpy headers and builds against any numpy (docs/packaging.md)
        out = np.empty((n, 2), dtype=np.int64)
        cdef int64_t[:, ::1] view = out
        if n:
            memcpy(&view[0, 0], buf, n * 2 * sizeof(int64_t))
        free(buf)
        return out

    # -- whole-bitmap operations

    def union_update(self, other):
        """self |= other (same nbits)."""
        self._check_other("union_update", other)
        cdef ExtentBitmap o = other
        cdef int rc = 0
        cdef bint same = self is o
        with nogil:
            _lock2(self._lock, o._lock)
            if not same:
                rc = _tree_union(&self._t, &o._t)
            _unlock2(self._lock, o._lock)
        if rc != 0:
            raise MemoryError("ExtentBitmap.union_update(): out of memory; the union is partial")

    def difference_update(self, other):
        """self &= ~other (same nbits); emptied leaves are freed."""
        self._check_other("difference_update", other)
        cdef ExtentBitmap o = other
        cdef bint same = self is o
        with nogil:
            _lock2(self._lock, o._lock)
            if same:
                _tree_clear_range(&self._t, 0, self._t.nbits)
            else:
                _tree_difference(&self._t, &o._t)
            _unlock2(self._lock, o._lock)

    def intersection_update(self, other):
        """self &= other (same nbits); emptied leaves are freed."""
        self._check_other("intersection_update", other)
        cdef ExtentBitmap o = other
        cdef bint same = self is o
        with nogil:
            _lock2(self._lock, o._lock)
            if not same:
                _tree_intersection(&self._t, &o._t)
            _unlock2(self._lock, o._lock)

    def copy(self):
        cdef ExtentBitmap dup = ExtentBitmap(self._t.nbits)
        cdef int rc
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
            rc = _tree_union(&dup._t, &self._t)
            PyThread_release_lock(self._lock)
        if rc != 0:
            raise MemoryError("ExtentBitmap.copy(): out of memory")
        return dup

    def __eq__(self, other):
        if not isinstance(other, ExtentBitmap):
            return NotImplemented
        cdef ExtentBitmap o = other
        cdef bint r
        with nogil:
            _lock2(self._lock, o._lock)
            r = _tree_equal(&self._t, &o._t)
            _unlock2(self._lock, o._lock)
        return r

    __hash__ = None                 # mutable

    def __reduce__(self):
        return (ExtentBitmap.from_bytes, (self.to_bytes(),))

    # -- persistence

    def to_bytes(self):
        """The on-disk form (docs/cext-bitmap.md), checksum included."""
        cdef bytes data
        cdef unsigned char *p
        cdef unsigned char *start
        cdef int64_t leaf
        cdef Leaf *lf = NULL
        cdef int i
        cdef size_t size
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
        try:
            size = C_HEADER_SIZE + self._t.nleaves * C_LEAF_RECORD_SIZE + C_TRAILER_SIZE
            data = PyBytes_FromStringAndSize(NULL, size)
            start = p = <unsigned char *>PyBytes_AS_STRING(data)
            with nogil:
                memcpy(p, <const char *>b"CMBITMAP", 8)
                cm_store_le32(p + 8, 1)
                cm_store_le32(p + 12, LEAF_BITS)
                cm_store_le64(p + 16, self._t.nbits)
                cm_store_le64(p + 24, self._t.nleaves)
                cm_store_le64(p + 32, self._t.count)
                p += C_HEADER_SIZE
                leaf = 0
                while True:
                    leaf = _next_leaf(&self._t, <uint64_t>leaf, &lf)
                    if leaf < 0:
                        break
                    cm_store_le64(p, <uint64_t>leaf)
                    for i in range(LEAF_WORDS):
                        cm_store_le64(p + 8 + 8 * i, lf.words[i])
                    p += C_LEAF_RECORD_SIZE
                    leaf += 1
                cm_store_le64(start + size - C_TRAILER_SIZE,
                              XXH3_64bits(start, size - C_TRAILER_SIZE))
        finally:
            PyThread_release_lock(self._lock)
        return data

    @staticmethod
    def from_bytes(data):
        """Rebuild a bitmap from to_bytes(); BitmapFormatError if torn, foreign or corrupt."""
        return _decode(memoryview(data).cast("B"), "<bytes>")

    def save(self, path):
        """Write atomically (cyclemirror.fileio.atomic_write): the old file or the new, never a mix."""
        atomic_write(path, self.to_bytes(), mode=0o644)

    @staticmethod
    def load(path):
        """Read a file written by save(); BitmapFormatError if torn, foreign or corrupt."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        return _decode(memoryview(data).cast("B"), path)


def _format_error(source, what):
    return BitmapFormatError(
        f"bitmap {source}: {what}; the file is torn, corrupt or not a cyclemirror "
        "bitmap: rebuild the bitmap (e.g. compare block hashes with the target)")


cdef object _decode(const uint8_t[::1] buf, str source):
    """Validate everything before allocating anything, then build the bitmap."""
    cdef size_t size = buf.shape[0]
    cdef const unsigned char *p
    cdef uint64_t nbits, nleaves, population, leaf, prev, max_leaf, tail_bits, total
    cdef uint64_t stored_sum, actual_sum, word
    cdef uint32_t version, leaf_bits
    cdef int i
    cdef size_t k
    cdef Leaf *lf
    cdef ExtentBitmap bm

    if size < C_HEADER_SIZE + C_TRAILER_SIZE:
        raise _format_error(source, f"only {size} bytes, less than the {C_HEADER_SIZE + C_TRAILER_SIZE}-byte minimum")
    p = &buf[0]
    if memcmp(p, <const char *>b"CMBITMAP", 8) != 0:
        raise _format_error(source, f"bad magic {(<const char *>p)[:8]!r}, expected {FORMAT_MAGIC!r}")
    version = cm_load_le32(p + 8)
    if version != C_FORMAT_VERSION:
        raise BitmapFormatError(
            f"bitmap {source}: format version {version}, this cyclemirror reads only "
            f"version {C_FORMAT_VERSION}; use a matching cyclemirror or rebuild the bitmap")
    leaf_bits = cm_load_le32(p + 12)
    nbits = cm_load_le64(p + 16)
    nleaves = cm_load_le64(p + 24)
    population = cm_load_le64(p + 32)
    if leaf_bits != LEAF_BITS:
        raise _format_error(source, f"leaf size {leaf_bits} bits, expected {LEAF_BITS}")
    if nbits > MAX_NBITS:
        raise _format_error(source, f"nbits {nbits} exceeds the 2**48 maximum")
    max_leaf = (nbits + LEAF_BITS - 1) >> LEAF_SHIFT
    if nleaves > max_leaf:
        raise _format_error(source, f"{nleaves} leaves for {nbits} bits (at most {max_leaf})")
    # nleaves <= 2**33 here, so this product cannot overflow
    total = C_HEADER_SIZE + nleaves * C_LEAF_RECORD_SIZE + C_TRAILER_SIZE
    if total != size:
        raise _format_error(source, f"{size} bytes, but the header announces {nleaves} leaves = {total} bytes")
    stored_sum = cm_load_le64(p + size - C_TRAILER_SIZE)
    with nogil:
        actual_sum = XXH3_64bits(p, size - C_TRAILER_SIZE)
    if stored_sum != actual_sum:
        raise _format_error(source, f"checksum {stored_sum:#018x} does not match the content ({actual_sum:#018x})")

    bm = ExtentBitmap(nbits)
    tail_bits = nbits & (LEAF_BITS - 1)
    prev = 0
    total = 0
    p += C_HEADER_SIZE
    for k in range(nleaves):
        leaf = cm_load_le64(p)
        if (k > 0 and leaf <= prev) or leaf >= max_leaf:
            raise _format_error(source, f"leaf record {k} has index {leaf}: indices must ascend and be < {max_leaf}")
        prev = leaf
        lf = _leaf_get_or_create(&bm._t, leaf)
        if lf == NULL:
            raise MemoryError(f"bitmap {source}: out of memory loading leaf {k}")
        with nogil:
            for i in range(LEAF_WORDS):
                lf.words[i] = cm_load_le64(p + 8 + 8 * i)
            _leaf_recount(lf)
        if lf.pop == 0:
            raise _format_error(source, f"leaf record {k} (index {leaf}) is empty; empty leaves are never written")
        if leaf == max_leaf - 1 and tail_bits != 0:
            if _tree_count_range(&bm._t, nbits, (leaf + 1) << LEAF_SHIFT) != 0:
                raise _format_error(source, f"leaf record {k} sets bits at or beyond nbits={nbits}")
        bm._t.count += lf.pop
        total += lf.pop
        p += C_LEAF_RECORD_SIZE
    if total != population:
        raise _format_error(source, f"header population {population} but the leaves hold {total} set bits")
    return bm


@cython.final
cdef class _RunIterator:
    """Batches runs in C under the bitmap's lock, hands them out one tuple at a time."""

    cdef ExtentBitmap _bm
    cdef uint64_t _pos, _stop, _max_run
    cdef size_t _n, _i
    cdef int64_t _buf[2 * 1024]

    def __cinit__(self, ExtentBitmap bm, uint64_t start, uint64_t stop, uint64_t max_run):
        self._bm = bm
        self._pos = start
        self._stop = stop
        self._max_run = max_run
        self._n = 0
        self._i = 0

    def __iter__(self):
        return self

    def __next__(self):
        cdef size_t i = self._i
        if i == self._n:
            if self._pos >= self._stop:
                raise StopIteration
            with nogil:
                PyThread_acquire_lock(self._bm._lock, WAIT_LOCK)
                self._n = _tree_runs(&self._bm._t, &self._pos, self._stop, self._max_run,
                                     self._buf, 1024)
                PyThread_release_lock(self._bm._lock)
            self._i = i = 0
            if self._n == 0:
                raise StopIteration
        self._i = i + 1
        return (self._buf[2 * i], self._buf[2 * i + 1])
