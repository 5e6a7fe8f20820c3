"""Certified coverage against the oracle, validity, a starved val_select, every policy, and the audit.

Scores come from :mod:`stage1_pro.simulation`, whose true FNR_exit, FPR_exit and coverage of every
exit rule are exact. The joint certificate is the product's: FNR_exit <= target and FPR_exit <=
max_fpr_exit with probability >= 1 - delta; a draw *violates* when its deployed rule breaks either
(must happen in <= delta of the draws, up to Monte-Carlo error: ``+-3se``). Sections:

``procedures``
    The reference model (prevalence 0.4, logits +-2.2, sd 1.5; oracle coverage 0.801), val_select =
    val_calib = n images: the softmax policy is fitted once per draw (grid and val_select counts) and
    every procedure of :data:`stage1_pro.certify.PROCEDURES` certifies the same grid on the same
    val_calib; MAPIE 1.6's ``BinaryClassificationController`` (exact binomial p-values, Holm, FNR_exit
    only) runs on the same grid when MAPIE is installed. Mean true coverage (0 when nothing
    certifies), violation rate, certified rate.
``starved``
    The same with val_calib = 5,000 and a poor val_select (no positives; 30 images; 300 images).
``policies``
    Every policy with the default procedure on the reference model (n 5,000 and 20,000), the
    rare-positive model with heavy ties (n 20,000) and the reference model with a gate that sees part
    of the error signal (n 5,000), beside the oracles of the softmax, gate and two-threshold rules.
``audit``
    The test audit's power against a true FNR_exit of 1.25 / 1.5 / 2 x target by the number of exited
    test positives (exact), and, end to end (calibrate, deploy, audit a fresh 5,000-image test split),
    how often valid runs are refused by the audit and by the old point-estimate and upper-bound rules.

Usage::

    python bench/calibration_validity.py [--draws 1000] [--policy-draws 300] [--sizes 1000,5000,20000]
        [--sections procedures,starved,policies,audit] [--quick] [--no-mapie]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from stage1_pro import audit
from stage1_pro import simulation as sim
from stage1_pro.certify import DEFAULT_PROCEDURE, PROCEDURES, certify
from stage1_pro.defaults import DEFAULT_AUDIT_LEVEL, DEFAULT_MAX_FPR_EXIT

SECTIONS = ("procedures", "starved", "policies", "audit")


def _experiment(target: float, delta: float, max_fpr: float, **plan) -> sim.Experiment:
    """An experiment under the bench's certificate settings; ``plan``: its n_calib, draws, seed, ..."""
    return sim.Experiment(target_fnr_exit=target, delta=delta, max_fpr_exit=max_fpr, **plan)


def _mapie_threshold(scores_calib, grid: np.ndarray, target: float, delta: float) -> float | None:
    """MAPIE 1.6 BinaryClassificationController on our FNR_exit risk and the same grid."""
    bcc = sim.mapie_fnr_controller(grid, target=target, delta=delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bcc.calibrate(scores_calib.probs, scores_calib.label)
    return None if bcc.best_predict_param is None else float(np.ravel(bcc.best_predict_param)[0])


def procedures_table(sizes, draws, target, delta, max_fpr, seed, use_mapie) -> dict:
    """Every procedure (and MAPIE) on the same grid and val_calib, per n (one softmax fit per draw)."""
    model = sim.REFERENCE_MODEL
    methods = list(PROCEDURES) + (["mapie_holm"] if use_mapie else [])
    results = {}
    for n in sizes:
        experiment = _experiment(target, delta, max_fpr, n_calib=n, draws=draws, seed=seed + n)
        acc = {m: {"viol": [], "cov": [], "cert": []} for m in methods}
        t0 = time.perf_counter()
        for scores in experiment.score_draws(model):
            policy = sim.fit_quietly("softmax", scores, **experiment.certificate)
            rates = model.threshold_rates(policy.grid_)
            for m in methods:
                if m == "mapie_holm":
                    t = _mapie_threshold(scores.subset("val_calib"), policy.grid_, target, delta)
                    j = None if t is None else int(np.nonzero(policy.grid_ == t)[0][0])
                else:
                    j = certify(
                        policy.calib_counts_, target=target, delta=delta, max_fpr=max_fpr, method=m,
                        select=policy.select_counts_,
                    ).deployed  # fmt: skip
                acc[m]["cert"].append(j is not None)
                acc[m]["cov"].append(0.0 if j is None else float(rates.coverage[j]))
                bad = j is not None and any(experiment.violates(sim.RuleRates(*(r[j] for r in rates))))
                acc[m]["viol"].append(bad)
        results[n] = {m: {k: float(np.mean(v)) for k, v in a.items()} for m, a in acc.items()}
        print(f"  n={n}: {draws} draws in {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def print_procedures(res, sizes, draws, delta) -> None:
    se3 = 3 * np.sqrt(delta * (1 - delta) / draws)
    cov_or = sim.REFERENCE_MODEL.oracle()
    print(f"\n### Procedures, reference model: mean certified coverage (oracle {cov_or:.3f}) / violation "
          f"rate / certified rate ({draws} draws; violations must be <= {delta + se3:.3f})")  # fmt: skip
    print("| procedure | " + " | ".join(f"n={n}: cov | viol | certified" for n in sizes) + " |")
    print("|" + "---|" * (1 + 3 * len(sizes)))
    for m in res[sizes[0]]:
        name = m + (" (default)" if m == DEFAULT_PROCEDURE else "")
        if m == "mapie_holm":
            name = "MAPIE 1.6 BinaryClassificationController (Holm, FNR_exit only)"
        cells = " | ".join(
            f"{res[n][m]['cov']:.3f} | {res[n][m]['viol']:.3f} | {res[n][m]['cert']:.3f}" for n in sizes
        )
        print(f"| {name} | {cells} |")


def starved_table(draws, target, delta, max_fpr, seed) -> None:
    methods = ("split_fallback_sequence", "split_fixed_sequence", "fallback_sequence", "holm")
    cases = [
        ("no positives (1,000 negatives)", {"n_select": 1000, "select_positives": False}),
        ("30 images", {"n_select": 30}),
        ("300 images", {"n_select": 300}),
        ("5,000 images", {"n_select": 5000}),
    ]
    print(f"\n### A poor val_select (reference model, val_calib 5,000, {draws} draws): "
          "certified rate / mean coverage / violation rate")  # fmt: skip
    print("| val_select | " + " | ".join(methods) + " |")
    print("|" + "---|" * (1 + len(methods)))
    for label, kw in cases:
        experiment = _experiment(target, delta, max_fpr, n_calib=5000, draws=draws, seed=seed, **kw)
        r = sim.procedure_comparison(sim.REFERENCE_MODEL, methods, experiment)
        cells = " | ".join(
            f"{r[m]['certified_rate']:.3f} / {r[m]['mean_coverage']:.3f} / {r[m]['violation_rate']:.3f}"
            for m in methods
        )
        print(f"| {label} | {cells} |", flush=True)


def policies_table(draws, target, delta, max_fpr, seed) -> None:
    full = sim.POLICY_VARIANTS
    main = [("softmax", {}), ("gate", {}), ("scrc", {})]
    cases = [
        ("reference", sim.REFERENCE_MODEL, 5000, full),
        ("reference", sim.REFERENCE_MODEL, 20000, main),
        ("ties (prevalence 0.1)", sim.TIES_MODEL, 20000, main),
        ("informative gate", sim.INFORMATIVE_GATE_MODEL, 5000, main),
    ]
    print(
        f"\n### Every policy, default procedure ({draws} draws): mean coverage / violation rate / certified"
    )
    print(
        "| model | n | policy | coverage | violations | certified | oracle (softmax / gate / two-threshold) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, model, n, configs in cases:
        oracles = [model.oracle(target, max_fpr, rule) for rule in ("softmax", "gate", "two_dim")]
        for policy, params in configs:
            experiment = _experiment(target, delta, max_fpr, n_calib=n, draws=draws, seed=seed + 7 * n)
            r = sim.validity_run(policy, model, experiment, **params)
            name = policy + "".join(f" {v}" for v in params.values())
            print(
                f"| {label} | {n} | {name} | {r['mean_coverage']:.3f} | {r['violation_rate']:.3f} | "
                f"{r['certified_rate']:.3f} | {' / '.join(f'{o:.3f}' for o in oracles)} |",
                flush=True,
            )


def audit_table(draws, target, delta, max_fpr, seed) -> None:
    level = audit.test_level(DEFAULT_AUDIT_LEVEL, max_fpr)
    print(f"\n### The test audit's power (level {DEFAULT_AUDIT_LEVEL}, each test at {level:g}): probability "
          "of refusing a run whose true FNR_exit is the column's, by exited test positives")  # fmt: skip
    effects = (1.25, 1.5, 2.0)
    print(
        "| exited test positives | " + " | ".join(f"FNR_exit {e * target:g} ({e:g}x)" for e in effects) + " |"
    )
    print("|" + "---|" * (1 + len(effects)))
    for n in (100, 300, 1000, 3000, 10000):
        cells = " | ".join(f"{float(audit.power(n, target, e * target, level)):.2f}" for e in effects)
        print(f"| {n:,} | {cells} |")
    needed = ", ".join(f"{e:g}x: {audit.trials_for_power(target, e * target, level):,}" for e in effects)
    print(f"Exited test positives for power {audit.POWER_GOAL}: {needed}")
    experiment = _experiment(target, delta, max_fpr, n_calib=5000, draws=draws, seed=seed)
    r = sim.audit_run("softmax", sim.REFERENCE_MODEL, experiment, n_test=5000)
    se3 = 3 * np.sqrt(DEFAULT_AUDIT_LEVEL * (1 - DEFAULT_AUDIT_LEVEL) / max(r["valid_draws"], 1))
    print(
        f"\nEnd to end (reference model, val_calib 5,000, test 5,000, {r['valid_draws']} valid runs of "
        f"{draws}): refused by the audit {r['false_refusal_rate']:.3f} (level {DEFAULT_AUDIT_LEVEL} + 3se = "
        f"{DEFAULT_AUDIT_LEVEL + se3:.3f}); by the old point-estimate rule "
        f"{r['point_estimate_refusal_rate']:.3f}; "
        f"by the old upper-bound rule {r['upper_bound_refusal_rate']:.3f}; mean power {r['mean_power']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--policy-draws", type=int, default=300, help="draws per row of the policies section")
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    ap.add_argument("--target", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--max-fpr-exit", type=float, default=DEFAULT_MAX_FPR_EXIT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="200 draws (60 per policy row), sizes 1000,5000")
    ap.add_argument("--no-mapie", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.draws, args.policy_draws, args.sizes = 200, 60, "1000,5000"
    sizes = [int(s) for s in args.sizes.split(",")]
    sections = [s.strip() for s in args.sections.split(",")]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    try:
        import mapie  # noqa: F401

        use_mapie = not args.no_mapie
    except ImportError:
        use_mapie = False
    print(f"reference model: {sim.REFERENCE_MODEL.describe()}; target FNR_exit {args.target}, max FPR_exit "
          f"{args.max_fpr_exit}, delta {args.delta}")  # fmt: skip
    settings = (args.target, args.delta, args.max_fpr_exit, args.seed)
    if "procedures" in sections:
        res = procedures_table(sizes, args.draws, *settings, use_mapie)
        print_procedures(res, sizes, args.draws, args.delta)
    if "starved" in sections:
        starved_table(args.draws, *settings)
    if "policies" in sections:
        policies_table(args.policy_draws, *settings)
    if "audit" in sections:
        audit_table(args.draws, *settings)


if __name__ == "__main__":
    main()
