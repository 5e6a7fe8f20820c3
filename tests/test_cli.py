"""The console script: verb dispatch, lazy imports, unknown verbs, check/demo-data/split, README <-> CI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_pro.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "data" / "artifacts"
HEAVY = ("torch", "torchvision", "timm", "peft", "kfp", "sklearn", "matplotlib", "scipy")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)


def test_help_lists_every_verb_without_importing_heavy_libraries() -> None:
    code = (
        "import sys; from stage1_pro.cli import main; rc = main(['--help']);"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules); print('HEAVY', heavy); sys.exit(rc)"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for verb in COMMANDS:
        assert re.search(rf"^  {re.escape(verb)} +\S", out.stdout, re.M), verb


def test_every_verb_help_is_lazy() -> None:
    """Building each verb's parser (what `stage1-pro VERB --help` does) imports no heavy library."""
    code = (
        "import sys\n"
        "from stage1_pro.cli import COMMANDS, build_parser\n"
        "for verb in COMMANDS:\n"
        "    parser, _ = build_parser(verb)\n"
        "    assert parser.format_help().startswith('usage: stage1-pro ' + verb), verb\n"
        f"    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "    if heavy:\n"
        "        sys.exit(f'{verb}: imports {heavy} at module top or in add_arguments; import in run()')\n"
        "    print('ok', verb)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.split() == [w for verb in COMMANDS for w in ("ok", verb)]


def test_console_script_installed() -> None:
    script = Path(sys.executable).parent / "stage1-pro"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.startswith("stage1-pro ")


def test_unknown_verb_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["splt"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'splt'. Did you mean: split?" in err
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean" not in err and f"Verbs: {', '.join(COMMANDS)}" in err


def test_verb_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["split", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 0.5 0.15 0.2 0.15)" in out and "deterministic" in out.lower()


# ------------------------------------------------------------------------------------------
# check


def test_check_valid_files(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.json"))
    assert main(["check", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("ok      ") == len(files)
    assert f"{EXAMPLES / 'thresholds.json'}: valid thresholds artifact (schema 1.0)" in out


def test_check_prints_every_error_with_its_path_and_exits_2(tmp_path: Path, capsys) -> None:
    doc = json.loads((EXAMPLES / "bundle.json").read_text())
    doc["model_file"] = "../model_best.pth"
    doc["active_exit_policy"] = "magic"
    doc["extra"] = 1
    del doc["blessed"]
    bad = tmp_path / "bundle.json"
    bad.write_text(json.dumps(doc))
    assert main(["check", str(bad), str(EXAMPLES / "config.json")]) == 2
    out = capsys.readouterr().out
    assert f"INVALID {bad}: invalid bundle artifact (4 error(s)):" in out
    for line in (
        "  $: 'blessed' is a required property",
        "  $: Additional properties are not allowed ('extra' was unexpected)",
        "  $.active_exit_policy: 'magic' is not one of ['softmax', 'gate', 'scrc']",
        "  $.model_file: '../model_best.pth' does not match",
    ):
        assert line in out
    assert f"ok      {EXAMPLES / 'config.json'}" in out  # the other file is still checked


def test_check_wrong_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--kind", "thresholds", str(EXAMPLES / "gateparams.json")]) == 2
    assert "this is a 'gateparams' artifact, not 'thresholds'" in capsys.readouterr().out


def test_check_truncated_missing_and_undetectable(tmp_path: Path, capsys) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text((EXAMPLES / "splits.json").read_text()[:200])
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"artifact": "weights"}')
    assert main(["check", str(cut), str(tmp_path / "none.json"), str(unknown)]) == 2
    out = capsys.readouterr().out
    assert f"INVALID {cut}: not valid JSON at line" in out and "(the file looks truncated)" in out
    assert f"INVALID {tmp_path / 'none.json'}: file not found" in out
    assert "cannot tell the artifact kind (field 'artifact' is 'weights')" in out


def test_check_unknown_kind_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "--kind", "weights", str(EXAMPLES / "config.json")])
    assert info.value.code == 2
    assert "invalid choice: 'weights'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# demo-data and split


def test_demo_data_then_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--per-digit", "8"]) == 0
    manifest = Path(capsys.readouterr().out.strip())
    assert manifest == tmp_path / "demo" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    assert lines[0] == "uri,label,digit" and len(lines) == 81
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["images", "manifest.csv"]

    out_path = tmp_path / "splits.json"
    assert main(["split", "--data", str(manifest), "--out", str(out_path), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    splits = json.loads(out_path.read_text())
    assert f"wrote {out_path}: splits_version {splits['splits_version']}, seed 2" in out
    for name, balance in splits["class_balance"].items():
        assert re.search(rf"^{name} +[\d.]+ +{balance['n']} +{balance['n_positive']} ", out, re.M), name
    assert main(["check", str(out_path)]) == 0


def test_demo_data_rerun_replaces_and_refuses_foreign_folders(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo-data", "--out", str(out), "--per-digit", "2"]) == 0
    assert main(["demo-data", "--out", str(out), "--per-digit", "1"]) == 0
    assert len(list((out / "images").iterdir())) == 10
    assert len((out / "manifest.csv").read_text().splitlines()) == 11
    foreign = tmp_path / "mine"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "holiday.jpg").write_bytes(b"x")
    capsys.readouterr()
    assert main(["demo-data", "--out", str(foreign)]) == 2
    assert (
        "images exists and was not written by demo-data; choose an empty --out folder"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in foreign.iterdir()) == ["images"]
    assert main(["demo-data", "--out", str(out), "--per-digit", "0"]) == 2
    assert "per_digit=0: must be between 1 and 500" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--fractions", "0.6", "0.1", "0.2", "0.2"],
            "fractions: train=0.6, val_select=0.1, val_calib=0.2, test=0.2 sum to 1.1",
        ),
        (["--fractions", "train=0.5", "holdout=0.5"], "unknown split name(s) 'holdout'"),
        (["--seed", "-3"], "seed=-3: the split seed must be an integer >= 0"),
    ],
)
def test_split_errors_exit_2_and_write_nothing(
    tiny_dataset: Path, tmp_path: Path, capsys, extra, message
) -> None:
    out_path = tmp_path / "splits.json"
    assert main(["split", "--data", str(tiny_dataset), "--out", str(out_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stage1-pro split: error: ") and message in err and "Traceback" not in err
    assert not out_path.exists()


def test_split_bad_data_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.csv").write_text("uri,label\nnone.png,1\n")
    assert main(["split", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.json")]) == 2
    assert "m.csv: line 2: image file not found or unreadable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


# ------------------------------------------------------------------------------------------
# README <-> CI


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [m.strip() for m in re.findall(r"```(?:bash|sh)?\n(.*?)```", quick, re.S)]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, test_command = commands
    assert main_job.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && ')
    assert test_command.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && ')
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in ci
    # the README's test command is the last command of .ci/run, so its exit status is the script's
    assert [line for line in ci if line.strip() and not line.startswith("#")][-1] == test_command


def test_readme_verb_table_lists_every_verb() -> None:
    text = (REPO / "README.md").read_text()
    table = text.split("## CLI verbs", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `([a-z-]+)` \|", table, re.M) == list(COMMANDS)


@pytest.mark.parametrize(
    ("verb", "function", "positional", "cli_only"),
    [
        ("validate", "stage1_pro.validate:validate_run", {"run"}, set()),
        ("drift", "stage1_pro.drift:check_drift", {"bundle", "data", "out"}, {"json"}),
    ],
)
def test_forwarded_options_reach_every_parameter(
    verb: str, function: str, positional: set[str], cli_only: set[str]
) -> None:
    """Every option of the verb lands in a parameter of its library function, and every keyword-only
    parameter gets an option: an option renamed on one side alone would otherwise be dropped."""
    import importlib
    import inspect

    from stage1_pro.cli import build_parser
    from stage1_pro.cli.options import forwarded_options

    module, name = function.split(":")
    func = getattr(importlib.import_module(module), name)
    parser, _ = build_parser(verb)
    required = [a.option_strings[0] for a in parser._actions if a.required]
    args = parser.parse_args([x for flag in required for x in (flag, "X")])
    forwarded = forwarded_options(func, args)
    keyword_only = {n for n, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY}
    options = set(vars(args)) - {"verbose"} - positional - cli_only
    assert set(forwarded) == options <= keyword_only
    assert keyword_only - options <= {"out_dir"}  # drift's --out, passed by name


def test_forwarded_options_prefers_renamed_values() -> None:
    import argparse

    from stage1_pro.cli.options import forwarded_options

    def work(path: str, *, out_dir: str = "", level: float = 0.1, seed: int = 0) -> None: ...

    args = argparse.Namespace(path="p", out="o", level=0.2, unrelated=True)
    assert forwarded_options(work, args, out_dir=args.out) == {"out_dir": "o", "level": 0.2}
