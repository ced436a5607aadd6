"""The learning-rate schedule: exact values of linear warm-up then cosine decay to zero."""

from __future__ import annotations

import math

import pytest

from igpt.schedule import lr_at


def test_warmup_is_linear_from_the_first_step():
    assert [lr_at(s, 1.0, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_after_warmup_exact_values():
    # warmup 4, total 20: cosine over 16 steps starting at step 4
    assert lr_at(4, 2.0, 4, 20) == 2.0
    assert lr_at(12, 2.0, 4, 20) == pytest.approx(1.0, abs=1e-15)  # half way: cos(pi/2) = 0
    assert lr_at(8, 2.0, 4, 20) == 2.0 * 0.5 * (1 + math.cos(math.pi * 4 / 16))
    assert lr_at(19, 2.0, 4, 20) == 2.0 * 0.5 * (1 + math.cos(math.pi * 15 / 16))
    assert lr_at(20, 2.0, 4, 20) == 0.0 and lr_at(25, 2.0, 4, 20) == 0.0


def test_no_warmup_and_monotone_decay():
    lrs = [lr_at(s, 3e-4, 0, 100) for s in range(100)]
    assert lrs[0] == 3e-4
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        lr_at(-1, 1.0, 0, 10)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 0, 0)
