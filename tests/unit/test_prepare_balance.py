"""Difficulty balancing from pass rates (the evaluation job's pass_rates.jsonl: tests/unit/test_evaluation.py)."""

import pytest

from torl.prepare.balance import balance, pass_rate_bin


def test_pass_rate_bins():
    assert [pass_rate_bin(r, 4) for r in (0.0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [0, 0, 1, 2, 3, 3]


def test_balance_drops_no_signal_and_flattens_bins():
    rates = {"s": 1.0, "u": 0.0, "e1": 0.875, "e2": 0.875, "e3": 0.75, "h1": 0.125, "m1": 0.5}
    ids = ["s", "u", "e1", "e2", "e3", "h1", "m1", "missing"]
    kept, dropped = balance(ids, rates, bins=4, seed=3)
    assert "pass rate 1" in dropped["s"] and "pass rate 0" in dropped["u"]
    assert dropped["missing"] == "no pass rate measured"
    easy = [i for i in kept if i.startswith("e")]
    assert len(easy) == 1 and "h1" in kept and "m1" in kept  # one per non-empty bin: the smallest holds one
    assert sum("over its share" in why for why in dropped.values()) == 2
    assert kept == [i for i in ids if i in kept]  # input order kept
    assert balance(ids, rates, bins=4, seed=3) == (kept, dropped)  # deterministic


def test_balance_options():
    rates = {"s": 1.0, "a": 0.9, "b": 0.95, "c": 0.1}
    kept, _ = balance(list(rates) + ["x"], rates, bins=2, per_bin=5, drop_solved=False, keep_unmeasured=True)
    assert kept == ["s", "a", "b", "c", "x"]
    kept, _ = balance(list(rates), rates, bins=2, per_bin=1)
    assert len(kept) == 2 and "c" in kept
    with pytest.raises(ValueError):
        balance([], {}, bins=0)
