"""Human-readable outputs of ``validate``: figures, the HTML/Markdown report and the model card.

Everything here renders a ``validation.json`` object (plus the run's config/splits/model
info); no metric is computed here — the numbers come from :mod:`stage1_pro.validate`, which
takes them from :mod:`stage1_pro.metrics`. Figures use matplotlib's object API with the Agg
canvas (no pyplot, no global backend state), so this runs headless in containers.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable
from typing import Any

from stage1_pro import storage
from stage1_pro.layout import MODEL_CARD_FILE

RISK_COVERAGE_PNG = "risk_coverage.png"
CONFUSION_PNG = "confusion.png"
REPORT_FORMATS = ("html", "md")


def format_value(x: Any, digits: int = 4, *, missing: str = "n/a", no: str = "no") -> str:
    """A value as a table cell: ``missing`` for None, ``yes``/``no`` for booleans, floats to ``digits``.

    Args:
        x: the value.
        digits: decimals of a float.
        missing: the text of None.
        no: the text of False (``NO`` where a refusal must stand out).
    """
    if x is None:
        return missing
    if isinstance(x, bool):
        return "yes" if x else no
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


_fmt = format_value  # the report templates' short name


def new_figure(width: float, height: float):  # -> matplotlib.figure.Figure
    """A matplotlib Figure on its own Agg canvas (no pyplot state), ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """The figure rendered as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def risk_coverage_png(validation: dict[str, Any]) -> bytes:
    """FNR_exit and selective risk against coverage on test, with the target and the deployed point."""
    rc = validation["risk_coverage"]
    fig = new_figure(5.4, 3.8)
    ax = fig.add_subplot()
    for key, label, colour in (
        ("fnr_exit", "FNR_exit", "tab:blue"),
        ("selective_risk", "selective risk", "tab:grey"),
    ):
        pts = [(c, r) for c, r in zip(rc["coverage"], rc[key], strict=True) if r is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1.6, color=colour, label=label)
    ax.axhline(validation["target_fnr_exit"], color="tab:red", ls="--", lw=1, label="target FNR_exit")
    op = rc.get("operating_point") or {}
    if op.get("fnr_exit") is not None:
        ax.plot([op["coverage"]], [op["fnr_exit"]], "o", color="black", label="deployed policy (FNR_exit)")
    ax.set_xlabel("coverage (fraction of images exited)")
    ax.set_ylabel("risk")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Risk-coverage on test, {validation['exit_policy']} policy ({rc['score']})", fontsize=9)
    return png_bytes(fig)


def confusion_png(validation: dict[str, Any]) -> bytes:
    """The 2 x 3 test confusion matrix (true label x decision) with counts."""
    conf = validation["confusion"]
    matrix = conf["matrix"]
    fig = new_figure(4.6, 2.6)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
    ax.set_xticks(range(len(conf["columns"])), conf["columns"])
    ax.set_yticks(range(len(conf["rows"])), conf["rows"])
    ax.set_xlabel("decision")
    ax.set_ylabel("true label")
    ax.set_title("Test decisions", fontsize=10)
    return png_bytes(fig)


def _checks_rows(validation: dict[str, Any], key: str = "checks") -> list[tuple[str, str, str, str, str]]:
    passed, failed = ("PASS", "FAIL") if key == "checks" else ("ok", "low")
    return [
        (
            c["name"],
            passed if c["passed"] else failed,
            _fmt(c.get("value")),
            _fmt(c.get("limit")),
            c["message"],
        )
        for c in validation.get(key, [])
    ]


def _audit_text(validation: dict[str, Any]) -> str:
    """The audit's verdict and what the test split can see, in one paragraph."""
    a = validation["audit"]
    verdict = "refused the run" if a["refused"] else "did not reject the certified bounds"
    return (
        f"The test audit {verdict} at level {a['level']:g} (exact one-sided binomial tests of FNR_exit "
        f"<= {validation['target_fnr_exit']} and FPR_exit <= {validation['max_fpr_exit']}, each at "
        f"{a['test_level']:g}; p-values {a['fnr_p_value']:.3g} and {a['fpr_p_value']:.3g}). With "
        f"{a['n_exited_positives']} exited test positives its power against a true FNR_exit of "
        f"{a['alternative_fnr_exit']:g} is {a['power']:.2f}; {a['positives_for_power']} exited positives "
        f"would give {a['power_goal']:g}."
    )


def _comparison_rows(validation: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for r in validation.get("policy_comparison", []):
        name = r["policy"] + (" (active)" if r["active"] else "")
        if r["feasible"] is None:
            rows.append((name, "not fitted", "", "", "", "", "", r.get("note", "")))
            continue
        rows.append(
            (
                name,
                _fmt(r["feasible"]),
                _fmt(r.get("val_calib_coverage")),
                _fmt(r.get("certified_fnr_upper_bound")),
                _fmt(r.get("certified_fpr_upper_bound")),
                _fmt(r.get("test_coverage")),
                _fmt(r.get("test_fnr_exit")),
                _fmt(r.get("test_fpr_exit")),
            )
        )
    return rows


_COMPARISON_HEADER = (
    "policy",
    "certified",
    "val_calib coverage",
    "FNR_exit bound",
    "FPR_exit bound",
    "test coverage",
    "test FNR_exit",
    "test FPR_exit",
)


_METRIC_ROWS = (
    ("coverage", "coverage"),
    ("fnr_exit", "FNR_exit"),
    ("fnr_exit_upper_bound", "FNR_exit Clopper-Pearson upper bound"),
    ("fpr_exit", "FPR_exit"),
    ("exit_accuracy", "exit accuracy"),
    ("selective_risk", "selective risk"),
    ("aurc", "AURC"),
    ("n", "images"),
    ("n_exited", "exited images"),
    ("n_exited_positives", "exited positives"),
    ("n_false_negatives", "false negatives among them"),
)


def _metric_rows(validation: dict[str, Any]) -> list[tuple[str, str, str]]:
    test = validation["test_metrics"]
    calib = validation.get("val_calib_metrics") or {}
    return [(label, _fmt(test.get(key)), _fmt(calib.get(key))) for key, label in _METRIC_ROWS if key in test]


_CHAMPION_ROWS = (
    ("coverage", "test coverage"),
    ("fnr_exit", "test FNR_exit"),
    ("fnr_exit_upper_bound", "test FNR_exit upper bound"),
    ("exit_accuracy", "test exit accuracy"),
    ("fpr_exit", "test FPR_exit"),
    ("aurc", "test AURC"),
)


def _champion_rows(validation: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Challenger vs champion on the same test split (empty without a compared champion)."""
    champion = validation.get("champion") or {}
    if "version" not in champion:
        return []
    ours, theirs = champion["challenger_test_metrics"], champion["test_metrics"]
    rows = [(label, _fmt(ours.get(key)), _fmt(theirs.get(key))) for key, label in _CHAMPION_ROWS]
    mine = (validation.get("certificate") or {}).get("upper_bound")
    rows.append(
        ("certified FNR_exit bound (val_calib)", _fmt(mine), _fmt(champion["certificate"]["upper_bound"]))
    )
    rows.append(("policy", validation["exit_policy"], champion["exit_policy"]))
    return rows


def _champion_text(validation: dict[str, Any]) -> str:
    champion = validation.get("champion") or {}
    if "version" not in champion:
        return f"Champion {champion['uri']}: {champion.get('note', '')}" if champion else ""
    overlap = {
        "none": "",
        "excluded": f" {champion['n_excluded']} images it was fitted on are left out for both models.",
        "unknown": " Its training images could not be identified (its manifest changed): any among "
        "this test split flatter it.",
    }[champion["overlap"]]
    return (
        f"Champion {champion['version']} ({champion['uri']}) re-scored on this run's "
        f"{champion['n_rescored']} val_select/val_calib/test images with its own preprocessing, its "
        f"{champion['exit_policy']} policy re-certified on this val_calib (target "
        f"{validation['target_fnr_exit']}, delta {validation['delta']}); coverage difference "
        f"(challenger - champion) {champion['coverage_difference']:+.4f}, tolerance {champion['tolerance']}."
        + overlap
    )


def _verdict(validation: dict[str, Any]) -> str:
    return "BLESSED" if validation["blessed"] else "NOT BLESSED"


def render_html(validation: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A self-contained HTML report (figures embedded), for the KFP UI and humans."""
    esc = html.escape

    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def section(heading: str, text: str, body: str) -> str:
        return f"<h2>{esc(heading)}</h2>\n<p>{esc(text)}</p>\n{body}"

    imgs = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{esc(name)}</figcaption></figure>"
        for name, data in figures.items()
    )
    cert = validation.get("certificate") or {}
    cert_rows = [
        (k, _fmt(cert.get(k)))
        for k in (
            "procedure",
            "n",
            "k",
            "upper_bound",
            "n_exited_negatives",
            "n_false_positives",
            "fpr_upper_bound",
            "feasible",
            "n_calib",
            "order_note",
        )
    ]
    policy = esc(validation["exit_policy"])
    colour = "#1a7f37" if validation["blessed"] else "#cf222e"
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "figure{display:inline-block;margin:.5em}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stage1-pro validation: {policy}</title>
<style>{style}</style>
</head><body>
<h1>Validation of the {policy} exit policy: <span style="color:{colour}">{_verdict(validation)}</span></h1>
<p>Target FNR_exit &le; {validation["target_fnr_exit"]} with FPR_exit &le; {validation["max_fpr_exit"]}
(certified on val_calib with confidence {1 - validation["delta"]:.2f}); audit on the held-out test split.
Rule: {esc(validation["rule"].get("description", ""))}</p>
<h2>Checks</h2>
{table(("check", "result", "value", "limit", "detail"), _checks_rows(validation))}
<p>{esc(_audit_text(validation))}</p>
<h2>Diagnostics (reported, not deciding)</h2>
{table(("diagnostic", "result", "value", "level", "detail"), _checks_rows(validation, "diagnostics"))}
<h2>Policies compared on the same val_calib and test</h2>
{table(_COMPARISON_HEADER, _comparison_rows(validation))}
<h2>Metrics</h2>
{table(("metric", "test", "val_calib"), _metric_rows(validation))}
{_champion_section(validation, table, section)}
<h2>Certificate (from {esc(validation["policy_file"])})</h2>
{table(("field", "value"), cert_rows)}
<h2>Figures</h2>
{imgs}
<p>Created {esc(validation["created_at"])}.</p>
</body></html>
"""


def _champion_section(validation: dict[str, Any], table: Any, section: Callable[[str, str, str], str]) -> str:
    """The champion-vs-challenger section of a report ("" without a champion).

    Args:
        validation: the validation record.
        table: the report format's table writer ``(header, rows) -> str``.
        section: the report format's section writer ``(heading, text, table) -> str``.
    """
    text = _champion_text(validation)
    if not text:
        return ""
    rows = _champion_rows(validation)
    body = table(("metric", "challenger (this run)", "champion"), rows) if rows else ""
    return section("Champion vs challenger (same test split)", text, body)


def render_markdown(validation: dict[str, Any], figure_names: list[str]) -> str:
    """The same report in Markdown, figures referenced as sibling PNG files."""

    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)

    def section(heading: str, text: str, body: str) -> str:
        return f"\n## {heading}\n\n{text}\n\n{body}\n"

    figs = "\n".join(f"![{name}]({name})" for name in figure_names)
    return f"""# Validation of the {validation["exit_policy"]} exit policy: {_verdict(validation)}

Target FNR_exit <= {validation["target_fnr_exit"]} with FPR_exit <= {validation["max_fpr_exit"]}
(certified on val_calib with confidence {1 - validation["delta"]:.2f}); audit on the held-out test split.
Rule: {validation["rule"].get("description", "")}

## Checks

{table(("check", "result", "value", "limit", "detail"), _checks_rows(validation))}

{_audit_text(validation)}

## Diagnostics (reported, not deciding)

{table(("diagnostic", "result", "value", "level", "detail"), _checks_rows(validation, "diagnostics"))}

## Policies compared on the same val_calib and test

{table(_COMPARISON_HEADER, _comparison_rows(validation))}

## Metrics

{table(("metric", "test", "val_calib"), _metric_rows(validation))}
{_champion_section(validation, table, section)}
## Figures

{figs}
"""


def _preprocessing_line(model_info: dict[str, Any]) -> str:
    """The recorded preprocessing spec in words (the certificate holds for these pixels)."""
    from stage1_pro.preprocessing import RECORD_KEY, PixelSpec

    if "img_size" not in model_info:
        return "n/a (no model.json)"
    spec = PixelSpec.from_record(model_info["img_size"], model_info.get(RECORD_KEY), "model.json")
    return f"{spec.describe()}, EXIF orientation applied, RGB (`stage1_pro.preprocessing`)"


def render_model_card(
    validation: dict[str, Any],
    config: dict[str, Any],
    splits: dict[str, Any],
    model_info: dict[str, Any] | None,
) -> str:
    """A model card (Mitchell et al., 2019 sections, shortened) for the run."""
    test = validation["test_metrics"]
    cert = validation.get("certificate") or {}
    balance = splits.get("class_balance", {})
    split_rows = "\n".join(
        f"| {name} | {b.get('n')} | {b.get('n_positive')} | {_fmt(b.get('positive_rate'), 3)} |"
        for name, b in balance.items()
    )
    info = model_info or {}
    backbone = info.get("model_name", config.get("model_name"))
    img_size = info.get("img_size", config.get("img_size"))
    lineage = validation.get("lineage", {})
    return f"""# Model card: stage-1 exit classifier ({validation["exit_policy"]} policy)

## Model details
- Backbone: `{backbone}` at {img_size} px, heads {info.get("heads", "?")};
  training phase {config.get("phase")}, fine-tune mode {config.get("finetune_mode")}.
- Preprocessing: {_preprocessing_line(info)}.
- Model version (sha256 of model_best.pth): `{lineage.get("model_version", "n/a")}`.
- Exit policy: `{validation["exit_policy"]}` from `{validation["policy_file"]}`; validation verdict:
  **{_verdict(validation)}**.

## Intended use
Stage 1 of a two-stage cascade for a binary image task. For each image it answers
exit-positive, exit-negative, or defers to stage 2. Use it only through
`stage1_pro.inference.load_bundle`, which takes every threshold from the policy file.
Not intended as a stand-alone classifier: deferred images must reach stage 2.

## Guarantee
With probability at least {1 - validation["delta"]:.2f} over the calibration draw, both hold: the
miss rate among exited positives is at most {validation["target_fnr_exit"]}
(FNR_exit = FN_exit / (TP_exit + FN_exit)) and the false-alarm rate among exited negatives is at
most {validation["max_fpr_exit"]} (FPR_exit = FP_exit / (FP_exit + TN_exit)), certified on
`val_calib` by `{cert.get("procedure", "?")}` (n = {cert.get("n", "?")} exited positives,
k = {cert.get("k", "?")} misses, Clopper-Pearson upper bound {_fmt(cert.get("upper_bound"))};
FPR_exit upper bound {_fmt(cert.get("fpr_upper_bound"))}).
The guarantee holds for images exchangeable with the calibration images: a new camera,
region, season or label definition voids it until the policy is recalibrated.

## Test audit
Coverage {_fmt(test.get("coverage"))}, FNR_exit {_fmt(test.get("fnr_exit"))}
(upper bound {_fmt(test.get("fnr_exit_upper_bound"))}), FPR_exit {_fmt(test.get("fpr_exit"))},
exit accuracy {_fmt(test.get("exit_accuracy"))}, AURC {_fmt(test.get("aurc"))} on {test.get("n")} images.
{_audit_text(validation)}

## Training and evaluation data
Dataset fingerprint `{lineage.get("data_fingerprint", "n/a")}`,
splits version `{lineage.get("splits_version", "n/a")}`
(seed {splits.get("seed")}, group-aware: {_fmt(splits.get("group_aware"))}).

| split | images | positives | positive rate |
|---|---|---|---|
{split_rows}

## Limitations and risks
- FNR_exit and FPR_exit are controlled; exit accuracy (which depends on the class balance) is only
  reported.
- The test audit sees only large violations on small test splits: its power is stated above.
- Near-duplicate images split across val_calib and test (e.g. frames of one sequence without a
  `group` column) make both the certificate and the audit optimistic.
- Few exited positives in val_calib mean little coverage: the certificate needs at least
  ~114 exited positives with zero misses at target 0.02 and delta 0.1.
"""


def write_reports(
    run_dir: str | os.PathLike[str],
    validation: dict[str, Any],
    *,
    config: dict[str, Any],
    splits: dict[str, Any],
    model_info: dict[str, Any] | None,
    fmt: str = "html",
) -> dict[str, Any]:
    """Write the figures, ``report.<fmt>`` and ``model_card.md`` into ``run_dir`` (atomically each).

    Returns:
        ``{"report_file", "model_card_file", "figures"}`` — file names inside ``run_dir``.
    """
    if fmt not in REPORT_FORMATS:
        from stage1_pro.errors import ConfigError

        raise ConfigError(f"report format {fmt!r} is unknown; allowed: {', '.join(REPORT_FORMATS)}")
    figures = {RISK_COVERAGE_PNG: risk_coverage_png(validation), CONFUSION_PNG: confusion_png(validation)}
    for name, data in figures.items():
        storage.write_bytes(storage.join(run_dir, name), data, content_type="image/png")
    report_file = f"report.{fmt}"
    text = render_html(validation, figures) if fmt == "html" else render_markdown(validation, list(figures))
    storage.write_text(storage.join(run_dir, report_file), text, content_type=f"text/{fmt}")
    storage.write_text(
        storage.join(run_dir, MODEL_CARD_FILE),
        render_model_card(validation, config, splits, model_info),
        "text/markdown",
    )
    return {"report_file": report_file, "model_card_file": MODEL_CARD_FILE, "figures": list(figures)}
