"""Run the compiled pipeline on this machine with ``kfp.local`` (``stage1-pro run-local``).

The pipeline is compiled to ``OUT/pipeline.yaml``, the same package the cluster receives, loaded
back and run by ``kfp.local.SubprocessRunner(use_venv=False)``: every task is a subprocess of
this interpreter (no containers, no ``pip install``), its artifacts under ``OUT/pipeline-root``.
GPU, node-selector and toleration settings have no effect locally (kfp warns; the warnings are
kept in the log). Afterwards the bundle is copied to ``OUT/bundle`` and a summary is printed and
written to ``OUT/summary.json``.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stage1_pro import storage
from stage1_pro.errors import Stage1ProError
from stage1_pro.report import format_value

PIPELINE_ROOT = "pipeline-root"
BUNDLE_DIR = "bundle"
DEMO_DIR = "demo-data"
LOG_FILE = "run-local.log"
SUMMARY_FILE = "summary.json"
PACKAGE_FILE = "pipeline.yaml"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_ERROR = re.compile(r"^\s*((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)): (.*)$")


class PipelineRunError(Stage1ProError):
    """A task of the local pipeline run failed."""


@dataclass
class LocalRunResult:
    """What ``run-local`` reports: the branch that ran, its validation verdict and the bundle."""

    exit_policy: str
    blessed: bool
    test_coverage: float
    test_fnr_exit: float | None
    test_fnr_exit_upper_bound: float | None
    certified_fnr_exit_upper_bound: float | None
    target_fnr_exit: float
    test_fpr_exit: float | None
    certified_fpr_exit_upper_bound: float | None
    max_fpr_exit: float
    delta: float
    bundle: str | None
    failed_checks: list[str]
    run_dir: str
    report: str | None
    seconds: float
    tasks: dict[str, float] = field(default_factory=dict)


def local_parameters(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Run parameters of a local run: the pipeline's defaults, the laptop model profile, ``overrides``."""
    from stage1_pro.run_parameters import LOCAL_PROFILE, defaults

    params = defaults()
    params.update(LOCAL_PROFILE)
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def run_local(
    params: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    echo: Callable[[str], None] | None = print,
    verbose: bool = False,
    cache: bool = False,
) -> LocalRunResult:
    """Run the whole pipeline locally on ``params`` (``data_uri`` absent: the embedded demo data).

    Args:
        params: run parameters (see :data:`stage1_pro.run_parameters.PARAMETERS`); missing ones take the
            local defaults (:func:`local_parameters`).
        out_dir: folder for the package, the pipeline root, the log, the bundle and the summary.
        echo: where progress lines go (``None``: silent).
        verbose: echo the full kfp.local log, not only task progress and ``[stage1-pro]`` lines.
        cache: reuse task results of earlier local runs into the same ``out_dir`` (kfp.local's cache).

    Raises:
        ConfigError: bad parameters (before anything runs).
        PipelineRunError: a task failed; the message names it and quotes its error.
    """
    from kfp import components, local

    from stage1_pro.pipelines.compile import compile_pipeline
    from stage1_pro.run_parameters import check_parameters

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda _line: None)
    params = local_parameters(params)
    if not params.get("data_uri"):
        from stage1_pro.demo_data import write_demo_dataset

        params["data_uri"] = str(write_demo_dataset(out / DEMO_DIR))
        say(f"embedded demo dataset (MNIST-5k, odd digit = positive) written to {out / DEMO_DIR}")
    check_parameters(params)

    package = compile_pipeline(out / PACKAGE_FILE)
    pipeline = components.load_component_from_file(str(package))
    root = out / PIPELINE_ROOT
    before = set(root.iterdir()) if root.is_dir() else set()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=cache,
        cache_root=str(out / ".kfp-cache") if cache else None,
    )
    say(
        f"running {package.name} with kfp.local: phase {params['phase']}, "
        f"exit_policy {params['exit_policy']}, {params['model_name']} @ {params['img_size']}px, "
        f"{params['epochs']} epoch(s)"
    )
    started = time.perf_counter()
    with (out / LOG_FILE).open("w", encoding="utf-8") as log, _Progress(log, say, verbose) as progress:
        try:
            with warnings.catch_warnings():
                # Expected locally: the image is not run, resource/GPU settings are ignored.
                warnings.filterwarnings("ignore", message=".*non-Python base image.*")
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
                pipeline(**params)
        except RuntimeError as exc:
            failed = progress.failed_task or "?"
            reason = progress.error_of(failed) or str(exc)
            raise PipelineRunError(
                f"local pipeline run failed in task {failed!r}: {reason} (full log: {out / LOG_FILE})"
            ) from None
    seconds = time.perf_counter() - started

    run_dirs = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not run_dirs:
        raise PipelineRunError(f"{root}: the local run left no output folder (full log: {out / LOG_FILE})")
    result = collect_result(run_dirs[-1], out, seconds, progress.durations)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


def collect_result(run_dir: Path, out: Path, seconds: float, tasks: Mapping[str, float]) -> LocalRunResult:
    """Read the branch's validation and copy its bundle (if blessed) to ``out/bundle``."""
    from stage1_pro.artifacts import read_artifact

    validations = sorted(run_dir.glob("validate*/validation/validation.json"))
    if len(validations) != 1:
        raise PipelineRunError(
            f"{run_dir}: expected exactly one exit-policy branch to have run, found "
            f"{len(validations)} validations"
        )
    validation = read_artifact(validations[0], "validation")
    bundles = sorted(run_dir.glob("export*/bundle/bundle.json"))
    bundle_dest = out / BUNDLE_DIR
    if bundles:
        _replace_dir(bundles[0].parent, bundle_dest)
    elif bundle_dest.exists():
        shutil.rmtree(bundle_dest)  # a previous run's bundle must not pass for this run's
    test = validation["test_metrics"]
    report = validations[0].parent / validation["report_file"] if validation.get("report_file") else None
    return LocalRunResult(
        exit_policy=validation["exit_policy"],
        blessed=bool(validation["blessed"]),
        test_coverage=float(test["coverage"]),
        test_fnr_exit=test.get("fnr_exit"),
        test_fnr_exit_upper_bound=test.get("fnr_exit_upper_bound"),
        certified_fnr_exit_upper_bound=(validation.get("certificate") or {}).get("upper_bound"),
        target_fnr_exit=float(validation["target_fnr_exit"]),
        test_fpr_exit=test.get("fpr_exit"),
        certified_fpr_exit_upper_bound=(validation.get("certificate") or {}).get("fpr_upper_bound"),
        max_fpr_exit=float(validation["max_fpr_exit"]),
        delta=float(validation["delta"]),
        bundle=str(bundle_dest) if bundles else None,
        failed_checks=[f"{c['name']}: {c['message']}" for c in validation["checks"] if not c["passed"]],
        run_dir=str(run_dir),
        report=str(report) if report else None,
        seconds=seconds,
        tasks=dict(tasks),
    )


def format_summary(result: LocalRunResult) -> str:
    """The summary table ``run-local`` prints."""

    confidence = f"{1 - result.delta:.0%}"
    rows = [
        ("exit policy", result.exit_policy, ""),
        ("coverage (test)", format_value(result.test_coverage), "share of test images stage 1 answers"),
        (
            "FNR_exit (test)",
            format_value(result.test_fnr_exit),
            f"missed positives among exited; {confidence} upper bound "
            f"{format_value(result.test_fnr_exit_upper_bound)}",
        ),
        (
            "certified FNR_exit <=",
            format_value(result.certified_fnr_exit_upper_bound),
            f"on val_calib with probability >= {confidence}; target {result.target_fnr_exit:g}",
        ),
        (
            "FPR_exit (test)",
            format_value(result.test_fpr_exit),
            "exited negatives called positive (the guard)",
        ),
        (
            "certified FPR_exit <=",
            format_value(result.certified_fpr_exit_upper_bound),
            f"certified with FNR_exit; guard max_fpr_exit {result.max_fpr_exit:g}",
        ),
        ("blessed", "yes" if result.blessed else "NO", "; ".join(result.failed_checks)),
        (
            "bundle",
            result.bundle or "none (not blessed)",
            "predict: stage1-pro predict --bundle PATH IMAGE..." if result.bundle else "",
        ),
        ("report", result.report or "n/a", ""),
    ]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows[:-2])
    lines = [f"  {k.ljust(width)}  {v.ljust(value_width)}  {note}".rstrip() for k, v, note in rows]
    return "\n".join([f"stage1-pro run-local finished in {result.seconds:.0f} s", *lines])


def _replace_dir(source: Path, dest: Path) -> None:
    with storage.staged_folder(dest, replace_contents=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


class _Progress(io.TextIOBase):
    """Stands in for ``sys.stdout`` while kfp.local runs: logs every line, echoes the progress.

    kfp.local prints each task's subprocess output and its own status lines to stdout; this keeps
    all of it in the log file and echoes one line per task start and end, plus the components'
    ``[stage1-pro]`` summary lines (everything with ``verbose``).
    """

    def __init__(self, log: io.TextIOBase, echo: Callable[[str], None], verbose: bool) -> None:
        self.log, self.echo, self.verbose = log, echo, verbose
        self.durations: dict[str, float] = {}
        self.failed_task: str | None = None
        self._lines: dict[str, list[str]] = {}
        self._current: str | None = None
        self._started: dict[str, float] = {}
        self._buffer = ""
        self._stdout = sys.stdout
        self._filtered: list[logging.Handler] = []
        self._root_level = logging.NOTSET
        self._print = builtins.print

    def __enter__(self) -> _Progress:
        sys.stdout = self
        # kfp.local indents task output by swapping builtins.print (logging_utils.indented_print);
        # with a dsl.ParallelFor, threads interleave the swaps and one can leave the indenting print
        # installed after the run. Restore the caller's print on the way out.
        self._print = builtins.print
        # kfp.local's orchestrator also logs through the root logger ("Skipping conditional task
        # ..."); keep those records in the log file rather than on the user's console.
        # kfp.local swaps the root logger's handlers around every task (local_logger_context) and,
        # with a dsl.ParallelFor, does so from several threads at once, which can leave a task's
        # handler in place of the original ones. Remember them: restore them at the end, and take
        # the filter off exactly the handlers that got it (else it would write to this closed log).
        root = logging.getLogger()
        self._filtered, self._root_level = list(root.handlers), root.level
        for handler in self._filtered:
            handler.addFilter(self._kfp_records)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in self._filtered:
            handler.removeFilter(self._kfp_records)
        root.handlers[:] = self._filtered
        root.setLevel(self._root_level)
        builtins.print = self._print
        self.flush()
        sys.stdout = self._stdout

    def _kfp_records(self, record: logging.LogRecord) -> bool:
        if "kfp/local" not in record.pathname.replace("\\", "/") or self.log.closed:
            return True
        self.log.write(f"{record.levelname} {record.getMessage()}\n")
        if self.verbose:
            self._out(f"{record.levelname} {record.getMessage()}")
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        if lines:
            self.log.flush()  # the log follows the run, for `tail -f`
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        if self.verbose:
            self._out(line)
        if start := _START.search(line):
            self._current = start.group(1)
            self._started[self._current] = time.perf_counter()
            self._lines[self._current] = []
            if not self.verbose:
                self._out(f"  > {self._current}")
            return
        if end := _END.search(line):
            task, status = end.groups()
            self.durations[task] = time.perf_counter() - self._started.get(task, time.perf_counter())
            if status != "SUCCESS":
                self.failed_task = self.failed_task or task
            if not self.verbose:
                self._out(
                    f"  {'ok' if status == 'SUCCESS' else status}  {task} ({self.durations[task]:.1f} s)"
                )
            self._current = None
            return
        if self._current is not None:
            self._lines[self._current].append(line)
        if not self.verbose and "[stage1-pro]" in line:
            self._out("      " + line.split("[stage1-pro]", 1)[1].strip())

    def _out(self, line: str) -> None:
        sys.stdout = self._stdout
        try:
            self.echo(line)
        finally:
            sys.stdout = self

    def error_of(self, task: str) -> str | None:
        """The exception line (and its continuation) a failed task printed last."""
        lines = self._lines.get(task, [])
        for i in range(len(lines) - 1, -1, -1):
            match = _ERROR.match(lines[i])
            if match:
                rest = [ln.strip() for ln in lines[i + 1 :] if ln.strip() and "KFP Executor" not in ln]
                return " ".join([f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}", *rest[:8]])
        return None
