"""Certification time against the number of calibration scores (n = 1e4 ... 1e7).

``ours``: what :meth:`SoftmaxThresholdPolicy.fit` does on val_calib once the grid is fixed:
confidence and predicted class, exited-positive and miss counts at every grid point (one sort
+ ``searchsorted`` each, :func:`stage1_pro.certify.count_at_least`), exact binomial p-values and
the default split fixed-sequence procedure (:func:`stage1_pro.certify.certify`).

``reference``: the straightforward implementation: for each grid point, boolean masks over all
n scores and their sums (``O(n m)``), then the same p-values and procedure. For large n·m it is
timed on a slice of the grid and scaled linearly to the full grid (its cost is exactly linear
in the number of grid points); such rows are marked ``*``. Both are checked to give identical
counts and the same deployed point.

Usage::

    python bench/calibration_scaling.py [--grid 1000] [--max-n 10000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stage1_pro.certify import certify, count_at_least, quantile_grid
from stage1_pro.simulation import GaussianScoreModel

N_SELECT = 20_000


def ours(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray, sel_n, sel_k):
    conf = probs.max(axis=1)
    pos = labels == 1
    miss = pos & (probs[:, 1] < probs[:, 0])
    n = count_at_least(conf[pos], grid)
    k = count_at_least(conf[miss], grid)
    cov = count_at_least(conf, grid) / conf.size
    scale = conf.size / N_SELECT
    return certify(
        n, k, target=0.02, delta=0.1, coverage=cov, n_select=sel_n, k_select=sel_k, calib_scale=scale
    )


def reference(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray, sel_n, sel_k):
    conf = probs.max(axis=1)
    pos = labels == 1
    miss = pos & (probs[:, 1] < probs[:, 0])
    n = np.empty(grid.size, dtype=np.int64)
    k = np.empty(grid.size, dtype=np.int64)
    cov = np.empty(grid.size)
    for j, t in enumerate(grid):
        exited = conf >= t
        n[j] = np.count_nonzero(exited & pos)
        k[j] = np.count_nonzero(exited & miss)
        cov[j] = np.count_nonzero(exited) / conf.size
    if sel_n is None:
        return n, k, cov
    scale = conf.size / N_SELECT
    return certify(
        n, k, target=0.02, delta=0.1, coverage=cov, n_select=sel_n, k_select=sel_k, calib_scale=scale
    )


def _best_time(repeats: int, fn, *args) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def _row(n: int, model, rng, grid, sel_n, sel_k, repeats: int, ref_budget: float) -> str:
    data = model.sample(n, rng)
    probs, labels = data["probs"], data["label"]
    t_ours = _best_time(repeats, ours, probs, labels, grid, sel_n, sel_k)
    cert = ours(probs, labels, grid, sel_n, sel_k)
    if n * grid.size <= ref_budget:
        ref = reference(probs, labels, grid, sel_n, sel_k)
        assert (
            np.array_equal(ref.n, cert.n) and np.array_equal(ref.k, cert.k) and ref.deployed == cert.deployed
        )
        t_ref, mark = _best_time(repeats, reference, probs, labels, grid, sel_n, sel_k), ""
    else:
        part = grid[:: max(1, grid.size // 20)]
        n_part, k_part, _ = reference(probs, labels, part, None, None)
        assert np.array_equal(n_part, cert.n[:: max(1, grid.size // 20)])
        assert np.array_equal(k_part, cert.k[:: max(1, grid.size // 20)])
        t_part = _best_time(1, reference, probs, labels, part, None, None)
        t_ref, mark = t_part * grid.size / part.size, "*"
    return f"| {n:.0e} | {t_ours:.3f} | {t_ref:.2f}{mark} | {t_ref / t_ours:.0f}x |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=1000)
    ap.add_argument("--max-n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-budget", type=float, default=2e9, help="max n*m for a full reference run")
    args = ap.parse_args()
    model = GaussianScoreModel()
    rng = np.random.default_rng(0)
    select = model.sample(N_SELECT, rng)
    grid = quantile_grid(select["probs"].max(axis=1), args.grid)
    conf_s = select["probs"].max(axis=1)
    pos_s = select["label"] == 1
    sel_n = count_at_least(conf_s[pos_s], grid)
    sel_k = count_at_least(conf_s[pos_s & (select["probs"][:, 1] < 0.5)], grid)
    print(f"grid: {grid.size} points (val_select quantiles); best of {args.repeats} runs; ratio = ref/ours")
    print("| n | ours (s) | reference (s) | ratio |")
    print("|---|---|---|---|")
    n = 10_000
    while n <= args.max_n:
        print(_row(n, model, rng, grid, sel_n, sel_k, args.repeats, args.ref_budget), flush=True)
        n *= 10


if __name__ == "__main__":
    main()
