"""cyclemirror.extents and cyclemirror.fileio: the shared leaves, on their own.

Proves: merge_adjacent joins exactly the touching runs of one kind (checked
unit by unit against a model) and stops reading when its consumer stops;
check_range refuses every range that does not fit, naming the object;
atomic_write replaces a file whole, with the asked mode, and leaves no temp
file behind when it fails.
"""

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import extents, fileio
from cyclemirror.errors import UsageError

runs_strategy = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5), st.sampled_from("ab")),
                         max_size=20)


def _laid_out(spec):
    """(gap, length, kind) triples -> ascending (start, length, kind) runs."""
    out, pos = [], 0
    for gap, length, kind in spec:
        pos += gap
        out.append((pos, length, kind))
        pos += length
    return out


@given(spec=runs_strategy)
@settings(max_examples=300, deadline=None)
def test_merge_adjacent_joins_exactly_touching_runs_of_one_kind(spec):
    runs = _laid_out(spec)
    merged = list(extents.merge_adjacent(runs))
    units = {p: k for s, n, k in runs for p in range(s, s + n)}
    assert {p: k for s, n, k in merged for p in range(s, s + n)} == units
    for (s1, n1, k1), (s2, _n2, k2) in zip(merged, merged[1:], strict=False):
        assert s1 + n1 < s2 or k1 != k2  # nothing left that could still be joined


def test_merge_adjacent_is_lazy():
    def runs():
        yield 0, 4, "a"
        yield 4, 4, "b"
        raise AssertionError("read past what the consumer took")

    it = extents.merge_adjacent(runs())
    assert next(it) == (0, 4, "a")


@pytest.mark.parametrize("offset, length", [(-1, 1), (0, -1), (4090, 7), (4097, 0),
                                            (1.0, 1), (0, "1")])
def test_check_range_refuses_what_does_not_fit(offset, length):
    with pytest.raises(UsageError, match="read on volume 'v'"):
        extents.check_range(offset, length, 4096, "read on volume 'v'")


def test_check_range_accepts_the_edges():
    for offset, length in [(0, 0), (0, 4096), (4096, 0), (4095, 1)]:
        extents.check_range(offset, length, 4096, "x")


def test_atomic_write_replaces_whole_with_the_asked_mode(tmp_path):
    path = tmp_path / "state.json"
    fileio.atomic_write(path, b"old")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0  # the default keeps it private
    fileio.atomic_write(path, memoryview(b"new and longer"), mode=0o644)
    assert path.read_bytes() == b"new and longer"
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044 == 0o044 & ~_umask()
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.json"
    fileio.atomic_write(path, b"old")
    with pytest.raises(TypeError):
        fileio.atomic_write(path, 12345)  # not bytes-like: fails before the rename
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
