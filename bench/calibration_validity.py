"""Certified coverage against the oracle, and validity, for every certification procedure.

Scores come from :class:`stage1_pro.simulation.GaussianScoreModel` (prevalence 0.3, classes at
+-1.6: oracle coverage 0.80 at FNR_exit <= 0.02), whose true FNR_exit and coverage of every
exit rule are exact. For each calibration-set size n (val_calib = val_select = n images) and
each draw, the softmax policy is fitted once (grid and val_select order); every procedure of
:data:`stage1_pro.certify.PROCEDURES` then certifies the same grid on the same val_calib, and
MAPIE 1.6's ``BinaryClassificationController`` (exact binomial p-values, Bonferroni-Holm) runs on
the same grid when MAPIE is installed. Printed per procedure and n:

* ``cov``: mean true coverage of the deployed rule (0 when nothing certifies),
* ``viol``: fraction of draws whose deployed rule has true FNR_exit > target (must be <= delta
  up to Monte-Carlo error, shown as ``+-3se``),
* ``inf``: fraction of infeasible draws.

A second table runs every policy (softmax, gate Platt/isotonic, SCRC-I/T) with the default
procedure. Usage::

    python bench/calibration_validity.py [--draws 1000] [--sizes 1000,5000,20000] [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from stage1_pro.certify import DEFAULT_PROCEDURE, PROCEDURES, certify
from stage1_pro.policies import InfeasibleCertificateWarning, create_policy
from stage1_pro.simulation import GaussianScoreModel, make_scores, validity_run


def _mapie_threshold(scores_calib, grid: np.ndarray, target: float, delta: float) -> float | None:
    """MAPIE 1.6 BinaryClassificationController on our FNR_exit risk and the same grid."""
    from mapie.risk_control import BinaryClassificationController, BinaryRisk

    risk = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == 0,
        risk_condition=lambda y_true, y_pred: (y_true == 1) & ~np.isnan(y_pred),
        higher_is_better=False,
    )

    def predict(probs: np.ndarray, t: float) -> np.ndarray:
        out = (probs[:, 1] >= probs[:, 0]).astype(float)
        out[probs.max(axis=1) < t] = np.nan
        return out

    bcc = BinaryClassificationController(
        predict_function=predict,
        risk=risk,
        target_level=target,
        confidence_level=1 - delta,
        best_predict_param_choice="abstention_rate",
        list_predict_params=grid[:, None],
        fwer_method="bonferroni_holm",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bcc.calibrate(scores_calib.probs, scores_calib.label)
    return None if bcc.best_predict_param is None else float(np.ravel(bcc.best_predict_param)[0])


def procedures_table(model, sizes, draws, target, delta, seed, use_mapie) -> dict:
    methods = list(PROCEDURES) + (["mapie_holm"] if use_mapie else [])
    results = {}
    for n in sizes:
        rng = np.random.default_rng(seed + n)
        acc = {m: {"viol": [], "cov": [], "inf": []} for m in methods}
        t0 = time.perf_counter()
        for _ in range(draws):
            scores = make_scores(model, n, n, rng)
            policy = create_policy("softmax", target_fnr_exit=target, delta=delta)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InfeasibleCertificateWarning)
                policy.fit(scores)
            sel_n, sel_k = policy.select_counts_
            cal_n, cal_k, cal_cov = policy.calib_counts_
            for m in methods:
                if m == "mapie_holm":
                    t = _mapie_threshold(scores.subset("val_calib"), policy.grid_, target, delta)
                else:
                    c = certify(
                        cal_n, cal_k, target=target, delta=delta, method=m, coverage=cal_cov,
                        n_select=sel_n, k_select=sel_k,
                    )  # fmt: skip
                    t = None if c.deployed is None else float(policy.grid_[c.deployed])
                if t is None:
                    acc[m]["viol"].append(False), acc[m]["cov"].append(0.0), acc[m]["inf"].append(True)
                else:
                    fnr, cov = model.softmax_curve(t)
                    acc[m]["viol"].append(bool(fnr > target)), acc[m]["cov"].append(float(cov))
                    acc[m]["inf"].append(False)
        results[n] = {m: {k: float(np.mean(v)) for k, v in a.items()} for m, a in acc.items()}
        print(f"  n={n}: {draws} draws in {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--target", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--policy-draws", type=int, default=None, help="draws for the per-policy table (default --draws)"
    )
    ap.add_argument("--quick", action="store_true", help="200 draws, sizes 1000,5000")
    ap.add_argument("--no-mapie", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.draws, args.sizes = 200, "1000,5000"
    sizes = [int(s) for s in args.sizes.split(",")]
    model = GaussianScoreModel()
    t_or, cov_or = model.oracle_softmax(args.target)
    try:
        import mapie  # noqa: F401

        use_mapie = not args.no_mapie
    except ImportError:
        use_mapie = False
    se3 = 3 * np.sqrt(args.delta * (1 - args.delta) / args.draws)
    print(
        f"GaussianScoreModel(mu={model.mu}, prevalence={model.prevalence}); target FNR_exit {args.target}, "
        f"delta {args.delta}; oracle softmax threshold {t_or:.4f}, oracle coverage {cov_or:.3f}; "
        f"{args.draws} draws; violation bound delta + 3se = {args.delta + se3:.3f}"
    )
    res = procedures_table(model, sizes, args.draws, args.target, args.delta, args.seed, use_mapie)
    print(
        f"\n### Softmax policy: mean certified coverage (oracle {cov_or:.3f}) / violation rate / infeasible"
    )
    header = "| procedure | " + " | ".join(f"n={n}: cov | viol | inf" for n in sizes) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(sizes)))
    for m in res[sizes[0]]:
        name = m + (" (default)" if m == DEFAULT_PROCEDURE else "")
        if m == "mapie_holm":
            name = "MAPIE 1.6 BinaryClassificationController (Holm)"
        cells = " | ".join(
            f"{res[n][m]['cov']:.3f} | {res[n][m]['viol']:.3f} | {res[n][m]['inf']:.3f}" for n in sizes
        )
        print(f"| {name} | {cells} |")
    for n in sizes:
        best = max((m for m in res[n] if m != "mapie_holm"), key=lambda m: res[n][m]["cov"])
        ok = all(res[n][m]["viol"] <= args.delta + se3 for m in res[n])
        print(f"n={n}: highest coverage: {best} (default {DEFAULT_PROCEDURE}); all valid: {ok}")

    pdraws = args.policy_draws or args.draws
    print(f"\n### Every policy, default procedure ({pdraws} draws)")
    print("| policy | n | mean coverage | oracle | violation rate | infeasible | SCRC FWER |")
    print("|---|---|---|---|---|---|---|")
    gate_oracle = model.oracle_gate(args.target)[1]
    configs = [
        ("softmax", {}, cov_or),
        ("gate", {"calibrator": "platt"}, gate_oracle),
        ("gate", {"calibrator": "isotonic"}, gate_oracle),
        ("scrc", {"variant": "SCRC-I"}, cov_or),
        ("scrc", {"variant": "SCRC-T"}, cov_or),
    ]
    for n in sizes:
        for policy, params, oracle in configs:
            r = validity_run(
                policy, model, n_calib=n, draws=pdraws, seed=args.seed + 7 * n,
                target_fnr_exit=args.target, delta=args.delta, **params,
            )  # fmt: skip
            label = policy + "".join(f" {v}" for v in params.values())
            fwer = "" if r["fwer"] is None else f"{r['fwer']:.3f}"
            print(
                f"| {label} | {n} | {r['mean_coverage']:.3f} | {oracle:.3f} | {r['violation_rate']:.3f} | "
                f"{r['infeasible_rate']:.3f} | {fwer} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
