"""Certify an exit policy on a scores file: FNR_exit <= target and FPR_exit <= max_fpr_exit, both
with probability >= 1 - delta.

Works from scores.npz alone (no model, no GPU). The grid and anything fitted (gate calibrator,
SCRC path, testing order) come from val_select; each grid point is tested on val_calib with exact
binomial p-values on its exited positives (FNR_exit) and exited negatives (FPR_exit, the guard
against calling everything positive), a family-wise procedure at delta keeps the certificate, and
the certified point with the largest coverage is written to the policy's file (the exit policies
are listed below).

When nothing certifies, the file says feasible: false, the policy defers every image, and a
warning says how many exited positives certifying would need.

Examples:
  stage1-pro calibrate --policy softmax --scores runs/a/scores.npz --out runs/a/thresholds.json
  stage1-pro calibrate --run runs/a --policy gate --calibrator isotonic
  stage1-pro calibrate --policy scrc --scores s.npz --out scrcparams.json --scrc-variant SCRC-T
"""

from __future__ import annotations

import argparse
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stage1_pro.policy_registry import PolicyOption


def policy_flags() -> dict[str, list[tuple[str, PolicyOption]]]:
    """Each policy flag of the registered policies -> the ``(policy, option)`` pairs behind it.

    Raises:
        ValueError: two policies give one flag different choices (one flag, one set of values).
    """
    from stage1_pro.policy_registry import policy_specs

    flags: dict[str, list[tuple[str, PolicyOption]]] = {}
    for spec in policy_specs():
        for option in spec.options:
            owners = flags.setdefault(option.flag, [])
            if owners and owners[0][1].choices != option.choices:
                raise ValueError(
                    f"policies {owners[0][0]!r} and {spec.name!r} both define {option.flag} but with "
                    f"different choices ({owners[0][1].choices} vs {option.choices})"
                )
            owners.append((spec.name, option))
    return flags


def policies_epilog() -> str:
    """The registered exit policies, their files, rules, phases and scripts (``--help``'s epilog)."""
    from stage1_pro.defaults import PHASES
    from stage1_pro.policy_registry import phases_text, policy_specs

    specs = policy_specs()
    name_width = max(len(s.name) for s in specs)
    file_width = max(len(s.file_name) for s in specs)
    lines = ["exit policies (--policy NAME): the file it writes, the phases that allow it, its script"]
    phases = {s.name: f"phase{'s' if s.min_phase < PHASES[-1] else ''} {phases_text(s)}" for s in specs}
    phase_width = max(map(len, phases.values()))
    for s in specs:
        where = [s.file_name.ljust(file_width), phases[s.name].ljust(phase_width)]
        if s.script:
            where.append(f"stage1_pro/scripts/{s.script}")
        lines.append(f"  {s.name.ljust(name_width)}  {'  '.join(where)}".rstrip())
        lines.append(f"  {' ' * name_width}  {s.rule}")
    return "\n".join(lines)


def _grid_size_defaults() -> str:
    from stage1_pro.policy_registry import policy_specs

    defaults = [
        f"{s.name} {inspect.signature(s.policy_class.__init__).parameters['grid_size'].default}"
        for s in policy_specs()
        if "grid_size" in inspect.signature(s.policy_class.__init__).parameters
    ]
    return ", ".join(defaults)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.certify import DEFAULT_PROCEDURE, PROCEDURES
    from stage1_pro.defaults import DEFAULT_MAX_FPR_EXIT
    from stage1_pro.policy_registry import list_policies

    a = parser.add_argument
    a("--policy", choices=list_policies(), help="exit policy (default: config.json's exit_policy with --run)")
    a("--scores", metavar="SCORES.npz", help="scores file (default RUN/scores.npz with --run)")
    a("--out", metavar="FILE", help="policy file to write (default: the policy's file next to the scores)")
    a(
        "--run",
        metavar="RUN_DIR",
        help="run directory: scores.npz, splits.json and config.json are read from it",
    )
    a(
        "--splits",
        metavar="SPLITS.json",
        help="check the scores' rows against these splits (default: RUN/splits.json)",
    )
    a(
        "--config",
        metavar="CONFIG.json",
        help="take target_fnr_exit, max_fpr_exit and delta from this config (default RUN/config.json)",
    )
    a("--target-fnr-exit", "--target_fnr_exit", type=float, metavar="X",
      help="certified FNR_exit bound in (0, 0.1] (default: the config's, else 0.02)")  # fmt: skip
    a(
        "--delta",
        type=float,
        metavar="D",
        help="failure probability in (0, 0.5] (default: the config's, else 0.1)",
    )
    a("--max-fpr-exit", "--max_fpr_exit", type=float, metavar="F",
      help=f"guard certified with the target: FPR_exit <= F, in (0, 1] (default: the config's, else "
      f"{DEFAULT_MAX_FPR_EXIT}; 1 disables it)")  # fmt: skip
    a("--method", choices=tuple(PROCEDURES), help=f"family-wise procedure (default {DEFAULT_PROCEDURE})")
    a(
        "--grid-size",
        "--grid_size",
        type=int,
        metavar="N",
        help=f"grid points (defaults: {_grid_size_defaults()})",
    )
    for flag, owners in policy_flags().items():
        option = owners[0][1]
        spellings = dict.fromkeys([flag, f"--{option.dest}"])  # --kebab-case and --snake_case
        help_text = "; ".join(f"{policy}: {o.help}" for policy, o in owners)
        a(*spellings, dest=option.dest, choices=option.choices, help=help_text)
    a(
        "--model-version",
        "--model_version",
        metavar="V",
        help="lineage (default: sha256 of model_best.pth next to the scores)",
    )
    a("--replace", action="store_true", help="delete another policy's file next to --out (a run holds one)")
    parser.epilog = policies_epilog()


def policy_options(policy: str, args: argparse.Namespace) -> dict[str, object]:
    """The constructor parameters the policy flags in ``args`` set for ``policy``.

    Raises:
        ConfigError: a flag of other policies only, e.g. ``--scrc-variant`` with ``--policy softmax``.
    """
    from stage1_pro.errors import ConfigError
    from stage1_pro.policy_registry import get_spec

    own = {option.flag: option for option in get_spec(policy).options}
    options: dict[str, object] = {}
    for flag, owners in policy_flags().items():
        value = getattr(args, owners[0][1].dest, None)
        if value is None:
            continue
        if flag not in own:
            names = [name for name, _ in owners]
            raise ConfigError(
                f"--policy {policy} does not take {flag}: {'/'.join(names)} options apply to "
                f"--policy {' | '.join(names)} only"
            )
        options[own[flag].param] = value
    return options


def run(args: argparse.Namespace) -> int:
    from stage1_pro import storage
    from stage1_pro.calibrate import calibrate_policy, default_out
    from stage1_pro.config import load_config
    from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_MAX_FPR_EXIT, DEFAULT_TARGET_FNR_EXIT
    from stage1_pro.errors import ConfigError
    from stage1_pro.layout import RunDir
    from stage1_pro.policies import load_policy
    from stage1_pro.policy_registry import list_policies

    run = RunDir(args.run) if args.run else None
    scores = args.scores or (run.scores if run else None)
    if scores is None:
        raise ConfigError("pass --scores SCORES.npz (or --run RUN_DIR)")
    config_uri = args.config or (run.config if run else None)
    config = None
    if config_uri and (args.config or storage.exists(config_uri)):
        config = load_config(config_uri)
    policy = args.policy or (config.exit_policy if config else None)
    if policy is None:
        raise ConfigError(f"pass --policy {'|'.join(list_policies())}")
    target = (
        args.target_fnr_exit
        if args.target_fnr_exit is not None
        else (config.target_fnr_exit if config else DEFAULT_TARGET_FNR_EXIT)
    )
    delta = args.delta if args.delta is not None else (config.delta if config else DEFAULT_DELTA)
    max_fpr_exit = (
        args.max_fpr_exit
        if args.max_fpr_exit is not None
        else (config.max_fpr_exit if config else DEFAULT_MAX_FPR_EXIT)
    )
    splits = args.splits or (run.splits if run else None)
    if splits and not args.splits and not storage.exists(splits):
        splits = None
    options = policy_options(policy, args)
    if args.grid_size is not None:
        options["grid_size"] = args.grid_size
    out = args.out or default_out(policy, scores)
    calibrate_policy(
        policy, scores, out, target_fnr_exit=target, delta=delta, max_fpr_exit=max_fpr_exit,
        method=args.method, splits_uri=splits,
        model_version=args.model_version, replace=args.replace, **options,
    )  # fmt: skip
    print(load_policy(out).summary())
    print(f"wrote {out}")
    return 0
