"""bench/kvindex_floor: the one-table prototype finds every entry it stored, by our key and by
engine hash, and nothing else (numba is optional: skipped without it)."""

from array import array

import numpy as np
import pytest

from infergw.bench import kvindex_floor


def test_without_numba_it_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_numba(name, *a, **kw):
        if name == "numba":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_numba)
    with pytest.raises(SystemExit, match="pip install numba"):
        kvindex_floor._compile()


def test_entries_are_found_both_ways_through_growth():
    pytest.importorskip("numba")
    table = kvindex_floor.EntryTable(10_000, kvindex_floor._compile())
    rng = np.random.default_rng(5)
    keys = rng.integers(2, 2**64 - 1, 3000, dtype=np.uint64)
    tags = rng.integers(2, 2**64 - 1, 3000, dtype=np.uint64)
    for i in range(0, 3000, 60):  # many resizes of both position tables
        table.add(array("Q", keys[i : i + 60].tolist()), array("Q", tags[i : i + 60].tolist()), 1)
    table.add(array("Q", keys[:10].tolist()), array("Q", tags[:10].tolist()), 1)  # repeats
    assert table.n == 3000
    assert (table.by_key.find(keys) == np.arange(3000)).all()
    assert (table.by_tag.find(tags) == np.arange(3000)).all()
    assert (table.by_key.find(tags) == -1).all()  # another table's values are not keys here
