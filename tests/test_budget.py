"""Sizing a run to a wall-time budget (igpt.budget): the planned steps fit the budget, the loop's hard time limit
sits inside it, and the measured step of a real (tiny) model is a positive number of seconds."""

from __future__ import annotations

import math

import pytest
import torch

from igpt.budget import PROBE_FIT_S, PROBE_FIXED_S, RESERVE, TRAIN_OVERHEAD, plan_steps, step_seconds
from igpt.presets import get_preset


def test_plan_steps_fits_the_budget():
    kw = dict(step_s=0.3, fwd_s=0.1, batch=32, n_eval_images=2800, n_feature_images=10000, n_sample_tokens=8192,
              max_steps=5000)
    small, big = plan_steps(300, **kw), plan_steps(600, **kw)
    assert 20 <= small["steps"] < big["steps"] < 5000
    for p in (small, big):  # training (with the loop's overhead) plus what is kept for later fits the budget
        assert p["steps"] * 0.3 * TRAIN_OVERHEAD + p["reserved_s"] <= p["budget_s"] + 1e-6
        # the loop's hard stop: the planned training time plus half the fixed reserve, inside the budget
        assert p["time_limit_s"] == pytest.approx(p["budget_s"] - p["reserved_s"] + RESERVE * p["budget_s"] / 2)
        assert p["steps"] * 0.3 * TRAIN_OVERHEAD < p["time_limit_s"] < p["budget_s"]
    assert not small["minimum"] and not big["minimum"]
    tiny = plan_steps(10, **kw)
    # a budget too small still trains a little: all of its 20 steps (a time limit stopped slow first steps at 5)
    assert tiny["steps"] == 20 and tiny["minimum"] and tiny["time_limit_s"] is None
    assert plan_steps(10**6, **kw)["steps"] == 5000  # capped
    # the probe's fits grow with images x feature sets: reserved before training, and said when over the budget
    fits = plan_steps(600, **kw, n_fit_sets=8)
    assert fits["reserved_s"] == pytest.approx(big["reserved_s"] + 10000 * 8 * PROBE_FIT_S + PROBE_FIXED_S)
    assert fits["steps"] < big["steps"] and fits["later_s"] == pytest.approx(fits["reserved_s"] - RESERVE * 600)
    assert plan_steps(10, **kw, n_fit_sets=8)["later_s"] > 10


def test_step_seconds_measures_a_real_step():
    step_s, fwd_s = step_seconds(get_preset("tiny"), batch_size=4, lr=1e-3, device=torch.device("cpu"), repeats=2)
    assert all(math.isfinite(t) and t > 0 for t in (step_s, fwd_s))
