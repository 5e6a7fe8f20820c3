"""Orchestration overhead of ``stage1-pro run-local``: the kfp.local pipeline vs the same steps in-process.

Runs the pipeline twice on the same data and settings:

* **direct**: the component functions themselves (``component.python_func``), called one after the
  other in this process with artifacts in a scratch folder: exactly the work of the steps;
* **run-local**: :func:`stage1_pro.pipelines.local.run_local`, i.e. compile, then kfp.local's
  ``SubprocessRunner(use_venv=False)``: one Python subprocess per task, kfp's executor, artifact
  bookkeeping, the branch conditions.

It prints both wall times, their ratio (the orchestration overhead) and the per-step times, and
checks the whole local run against the 3-minute budget. The machine is shared, so only the ratio
measured within one run is meaningful; ``--repeats`` alternates the order.

    python bench/pipeline_local.py                 # the README's main job: full demo data, defaults
    python bench/pipeline_local.py --fast          # the test settings (2,500 images, frozen backbone)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGET_S = 180.0
FAST = {"img_size": 64, "epochs": 1, "target_fnr_exit": 0.05, "config_overrides": {"finetune_mode": "frozen"}}


def run_direct(params: dict[str, Any], scratch: Path) -> dict[str, float]:
    """Run every step's component function in this process; return seconds per step."""
    from kfp import dsl

    from stage1_pro.components.calibrate import calibrate
    from stage1_pro.components.check_config import check_config, fingerprint
    from stage1_pro.components.data import merge_prepared, prepare, split
    from stage1_pro.components.export import export
    from stage1_pro.components.train import train
    from stage1_pro.components.validate import validate
    from stage1_pro.pipelines.pipeline import PREPARE_WORKERS

    def art(cls: type, name: str) -> Any:
        return cls(name=name, uri=str(scratch / name), metadata={})

    times: dict[str, float] = {}

    def step(name: str, fn: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn.python_func(**kwargs)
        times[name] = time.perf_counter() - start
        print(f"  direct {name}: {times[name]:.1f} s", flush=True)
        return out

    check_args = {k: v for k, v in params.items() if k != "data_uri"}
    checked = step(
        "check-config",
        check_config,
        data_uri=params["data_uri"],
        config=art(dsl.Artifact, "config"),
        **check_args,
    )
    dataset = dsl.Dataset(name="dataset", uri=params["data_uri"], metadata={})
    fp = step("fingerprint", fingerprint, dataset=dataset)
    splits = art(dsl.Dataset, "splits")
    step("split", split, dataset=dataset, data_fingerprint=fp, seed=params["seed"], splits=splits)
    shard = step(
        "prepare",
        prepare,
        dataset=dataset,
        img_size=params["img_size"],
        splits=splits,
        shard={"index": 0, "count": 1, "preprocessing": checked[1]},
        workers=PREPARE_WORKERS,
        prepared=art(dsl.Dataset, "prepared-0"),
    )
    prepared = art(dsl.Dataset, "prepared")
    step("merge-prepared", merge_prepared, slices=[shard], data_fingerprint=fp, prepared=prepared)
    model, scores = art(dsl.Model, "model"), art(dsl.Dataset, "scores")
    step(
        "train",
        train,
        config_json=checked[0],
        splits=splits,
        prepared=prepared,
        data_fingerprint=fp,
        weights_version=checked[-1],
        gpu_count=1,
        model=model,
        scores=scores,
        metrics=art(dsl.Metrics, "train-metrics"),
    )
    policy = art(dsl.Artifact, "policy")
    step(
        "calibrate",  # the task's name in the first branch; later branches' tasks get -2, -3 (like validate)
        calibrate,
        scores=scores,
        exit_policy=params["exit_policy"],
        target_fnr_exit=params["target_fnr_exit"],
        delta=params["delta"],
        policy=policy,
        metrics=art(dsl.Metrics, "calibrate-metrics"),
    )
    validation = art(dsl.Artifact, "validation")
    blessed = step(
        "validate",
        validate,
        model=model,
        policy=policy,
        data_uri=params["data_uri"],
        champion_uri="",
        validation=validation,
        metrics=art(dsl.Metrics, "validate-metrics"),
        exits=art(dsl.ClassificationMetrics, "exits"),
        report=art(dsl.HTML, "report"),
        model_card=art(dsl.Markdown, "model_card"),
    )
    if blessed:
        step(
            "export",
            export,
            model=model,
            policy=policy,
            validation=validation,
            bundle=art(dsl.Model, "bundle"),
        )
    return times


def run_pipeline(params: dict[str, Any], out: Path) -> tuple[float, dict[str, float]]:
    from stage1_pro.pipelines.local import run_local

    start = time.perf_counter()
    result = run_local(params, out, echo=lambda line: print(f"  run-local {line.strip()}", flush=True))
    return time.perf_counter() - start, result.tasks


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished descendants (every task subprocess)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fast", action="store_true", help="test settings: 2,500 images, frozen backbone, 64 px"
    )
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each (alternating order)")
    parser.add_argument("--keep", help="keep the outputs in this folder")
    args = parser.parse_args()

    from stage1_pro.demo_data import write_demo_dataset
    from stage1_pro.pipelines.local import local_parameters

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-pipeline-local-"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = write_demo_dataset(root / "data", per_digit=250 if args.fast else None)
    params = local_parameters({"data_uri": str(manifest), **(FAST if args.fast else {})})
    print(f"settings: {params}")

    pipeline_s: list[float] = []
    direct_s: list[float] = []
    cpu: dict[str, list[float]] = {"direct": [], "pipeline": []}
    tasks: dict[str, float] = {}
    direct: dict[str, float] = {}
    try:
        for r in range(args.repeats):
            order = ("direct", "pipeline") if r % 2 == 0 else ("pipeline", "direct")
            for which in order:
                cpu_start = cpu_seconds()
                if which == "direct":
                    scratch = root / f"direct-{r}"
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir()
                    start = time.perf_counter()
                    direct = run_direct(params, scratch)
                    direct_s.append(time.perf_counter() - start)
                else:
                    wall, tasks = run_pipeline(params, root / f"run-local-{r}")
                    pipeline_s.append(wall)
                cpu[which].append(cpu_seconds() - cpu_start)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    best_pipeline, best_direct = min(pipeline_s), min(direct_s)
    print()
    print(f"{'step':<20}{'direct s':>10}{'in run-local s':>16}")
    for name in direct:
        print(f"{name:<20}{direct[name]:>10.1f}{tasks.get(name, float('nan')):>16.1f}")
    print()
    every_direct = ", ".join(f"{s:.1f}" for s in direct_s)
    every_pipeline = ", ".join(f"{s:.1f}" for s in pipeline_s)
    print(f"direct (sum of the steps in-process): {best_direct:7.1f} s   (all: {every_direct})")
    print(f"run-local (kfp.local, whole run):     {best_pipeline:7.1f} s   (all: {every_pipeline})")
    print(
        f"orchestration overhead ratio run-local / direct = {best_pipeline / best_direct:.3f} "
        f"(+{best_pipeline - best_direct:.1f} s)"
    )
    # Training dominates and its time is the noisiest on a shared machine; the same ratio without it:
    rest_direct = best_direct - direct.get("train", 0.0)
    rest_pipeline = best_pipeline - tasks.get("train", 0.0)
    print(
        f"without the train step: run-local {rest_pipeline:.1f} s / direct {rest_direct:.1f} s = "
        f"{rest_pipeline / rest_direct:.2f} (+{(rest_pipeline - rest_direct) / len(direct):.2f} s per task)"
    )
    # CPU seconds do not grow when other jobs share the cores: the steadier overhead measure here.
    cpu_direct, cpu_pipeline = min(cpu["direct"]), min(cpu["pipeline"])
    print(
        f"CPU time (user+sys, all processes): run-local {cpu_pipeline:.1f} s / direct {cpu_direct:.1f} s = "
        f"{cpu_pipeline / cpu_direct:.3f}"
    )
    verdict = "within" if best_pipeline <= BUDGET_S else "OVER"
    print(
        f"whole local run {best_pipeline:.0f} s: {verdict} the {BUDGET_S:.0f} s budget "
        f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
