"""The drift check: score new, unlabelled images with a bundle and test them against its reference.

:func:`check_drift` loads a bundle (a folder, or a registry URI pulled and verified), reads its
``score_reference.json`` (the val_calib exit-score distribution written at export), scores the new
images with the bundle's own :class:`~stage1_pro.inference.Predictor` (its preprocessing, model and
policy), and runs the :class:`~stage1_pro.exchangeability.ExchangeabilityMonitor`. With an output
folder it writes ``drift.png`` (reference vs new score distributions), ``drift.html`` (the verdict,
the tests, the figure) and ``drift.json`` (schema ``drift``, written last).

What it can and cannot see is in the README (*Drift: is the certificate still about these images?*).
"""

from __future__ import annotations

import base64
import html
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.exchangeability import (
    DEFAULT_DRIFT_LEVEL,
    DEFAULT_POWER,
    DEFAULT_SHIFT,
    DriftResult,
    ExchangeabilityMonitor,
)
from stage1_pro.layout import DRIFT_FILE, DRIFT_PLOT_FILE, DRIFT_REPORT_FILE
from stage1_pro.report import format_value as _fmt

log = logging.getLogger(__name__)

#: Images scored between two progress lines.
PROGRESS_EVERY = 512


def check_drift(
    bundle: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    level: float = DEFAULT_DRIFT_LEVEL,
    shift: float = DEFAULT_SHIFT,
    power: float = DEFAULT_POWER,
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Test whether new images are still exchangeable with the bundle's val_calib (label-free).

    Args:
        bundle: a bundle folder, or a registry URI (``PREFIX``, ``PREFIX/latest``, ``PREFIX/VERSION``).
        data: the new images: a manifest (labels optional, ignored) or a folder / ``gs://`` prefix.
        out_dir: where to write drift.json, drift.png and drift.html (None: write nothing).
        level: false-alarm rate of the check, in (0, 0.5].
        shift: the KS distance the sample-size statement is about, in (0, 1].
        power: the detection probability that statement guarantees, in (0, 1).
        max_images: score at most this many images, drawn at random (``seed``); None: all.
        seed: seed of that draw.
        batch_size: images per forward pass.
        device: torch device.
        skip_bad: report unreadable images and go on (default: stop, naming the image).

    Returns:
        The ``drift`` artifact (``drift`` says the verdict).

    Raises:
        ConfigError: a setting out of range.
        ArtifactError: not a bundle, one that does not verify, or one without a score reference.
        DataError: no images, a missing or unreadable image (without ``skip_bad``).
    """
    from stage1_pro import storage
    from stage1_pro.artifacts import stamp, validate_artifact, write_artifact
    from stage1_pro.data import load_image_uris
    from stage1_pro.inference import load_bundle
    from stage1_pro.provenance import utc_now
    from stage1_pro.registry import local_bundle

    monitor = ExchangeabilityMonitor(level=level, shift=shift, power=power)
    monitor.validate_params()  # fail before any image is scored
    if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
        raise ConfigError(f"max_images={max_images!r} must be a positive integer (or None for all images)")
    uris = load_image_uris(data)
    n_available = len(uris)
    if max_images is not None and n_available > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(n_available, size=max_images, replace=False))
        uris = [uris[i] for i in pick]
    with local_bundle(bundle) as folder:
        predictor = load_bundle(folder, device=device)
        reference = _read_reference(folder, predictor.bundle)
    monitor.fit(reference["exit_score"], reference["p_positive"], reference["exited"])
    scored = _score(predictor, uris, batch_size=batch_size, skip_bad=skip_bad)
    if not scored["exit_score"].size:
        raise DataError(f"{data}: none of the {len(uris)} images could be read; nothing to compare")
    result = monitor.test(scored["exit_score"], scored["p_positive"], scored["exited"])
    out: dict[str, Any] = {
        "created_at": utc_now(),
        "bundle_version": predictor.bundle["version"],
        "exit_policy": predictor.bundle["active_exit_policy"],
        "data": str(data),
        **result.to_dict(),
        "n_available": n_available,
        "n_skipped": scored["n_skipped"],
    }
    verdict = "DRIFT" if result.drift else "consistent"
    log.info("drift check of %d images against bundle %s: %s", result.n_new, out["bundle_version"], verdict)
    if out_dir is None:
        stamped = stamp(out, "drift")
        validate_artifact(stamped, "drift")
        return stamped
    folder_out = Path(out_dir)
    figure = drift_png(reference, scored, result)
    storage.write_bytes(folder_out / DRIFT_PLOT_FILE, figure, content_type="image/png")
    out["plot_file"] = DRIFT_PLOT_FILE
    storage.write_text(folder_out / DRIFT_REPORT_FILE, render_html(out, figure), content_type="text/html")
    return write_artifact(folder_out / DRIFT_FILE, "drift", out)  # last: marks the report complete


def _read_reference(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from stage1_pro.artifacts import read_artifact

    name = meta.get("score_reference_file")
    if not name:
        raise ArtifactError(
            f"{folder}/bundle.json: no score_reference_file — bundle {meta['version']} was exported before "
            "bundles carried their val_calib score reference; export the run again to monitor it"
        )
    return read_artifact(folder / name, "score_reference")


def _score(predictor: Any, uris: list[str], *, batch_size: int, skip_bad: bool) -> dict[str, Any]:
    """Exit score, p(positive) and exited flag of each readable image, scored in chunks with progress."""
    exit_score: list[float] = []
    p_positive: list[float] = []
    exited: list[bool] = []
    skipped = 0
    step = max(PROGRESS_EVERY, batch_size)
    for start in range(0, len(uris), step):
        for p in predictor.predict(uris[start : start + step], batch_size=batch_size, skip_bad=skip_bad):
            if p.error is not None:
                skipped += 1
                continue
            exit_score.append(float(p.confidence))
            p_positive.append(float(p.probs[1]))
            exited.append(bool(p.exited))
        log.info("scored %d / %d images", min(start + step, len(uris)), len(uris))
    return {
        "exit_score": np.asarray(exit_score, dtype=np.float64),
        "p_positive": np.asarray(p_positive, dtype=np.float64),
        "exited": np.asarray(exited, dtype=bool),
        "n_skipped": skipped,
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The verdict, one line per test, and the sample-size statement (what the CLI prints)."""
    verdict = "DRIFT DETECTED" if report["drift"] else "CONSISTENT"
    lines = [
        f"{verdict}: {report['n_new']} new images vs {report['n_reference']} val_calib images of bundle "
        f"{report['bundle_version']} (false-alarm rate <= {report['level']:g}, Bonferroni over "
        f"{len(report['tests'])} tests)"
    ]
    for t in report["tests"]:
        lines.append(
            f"  {'DRIFT' if t['drift'] else 'ok   '}  {t['name']:<10}  statistic {t['statistic']:+.4f}  "
            f"p-value {t['p_value']:.3g} (level {t['level']:.3g})  reference {_fmt(t['reference'])} "
            f"-> new {_fmt(t['new'])}"
        )
    needed = report["n_needed"]
    if needed is None:
        lines.append(
            f"  sample size: the reference ({report['n_reference']} images) is too small to guarantee "
            f"detecting a shift of {report['shift']:g} (KS distance) with probability {report['power']:g}"
        )
    else:
        lines.append(
            f"  sample size: {needed} new images suffice to detect a shift of {report['shift']:g} (KS "
            f"distance of the exit scores, or an exit-rate change of that size) with probability >= "
            f"{report['power']:g}; with {report['n_new']}, shifts >= {report['detectable_shift']:.3f} are"
        )
    if report["underpowered"] and not report["drift"]:
        lines.append(
            "  note: too few new images for that guarantee — 'consistent' does not rule out such a shift"
        )
    return lines


def drift_png(reference: dict[str, Any], scored: dict[str, Any], result: DriftResult) -> bytes:
    """Reference vs new: the exit-score distributions (ECDFs) and p(positive) histograms."""
    from stage1_pro.report import new_figure, png_bytes

    fig = new_figure(9.5, 3.6)
    ax_score, ax_p = fig.subplots(1, 2)
    tests = {t.name: t for t in result.tests}
    for values, label, colour in (
        (np.asarray(reference["exit_score"]), f"reference (val_calib, n={result.n_reference})", "tab:blue"),
        (scored["exit_score"], f"new (n={result.n_new})", "tab:orange"),
    ):
        x = np.sort(values)
        ax_score.step(x, np.arange(1, x.size + 1) / x.size, where="post", color=colour, label=label)
    ax_score.set_xlabel(f"exit score ({reference.get('score', 'policy confidence')})")
    ax_score.set_ylabel("fraction of images <= score")
    t = tests["exit_score"]
    ax_score.set_title(f"exit score: KS {t.statistic:.3f}, p={t.p_value:.2g}", fontsize=9)
    ax_score.legend(fontsize=7, loc="upper left")
    ax_score.grid(alpha=0.3)
    bins = np.linspace(0, 1, 26)
    ax_p.hist(
        reference["p_positive"], bins=bins, density=True, alpha=0.5, color="tab:blue", label="reference"
    )
    ax_p.hist(scored["p_positive"], bins=bins, density=True, alpha=0.5, color="tab:orange", label="new")
    t = tests["p_positive"]
    rate = tests["exit_rate"]
    ax_p.set_title(
        f"p(positive): KS {t.statistic:.3f}, p={t.p_value:.2g}; exit rate "
        f"{result.exit_rate_reference:.3f} -> {result.exit_rate_new:.3f} (p={rate.p_value:.2g})",
        fontsize=9,
    )
    ax_p.set_xlabel("p(positive)")
    ax_p.set_ylabel("density")
    ax_p.legend(fontsize=7)
    verdict = "DRIFT DETECTED" if result.drift else "consistent with val_calib"
    fig.suptitle(f"{verdict} (level {result.level:g})", fontsize=10)
    return png_bytes(fig)


def render_html(report: dict[str, Any], figure: bytes) -> str:
    """A self-contained HTML page (figure embedded) for the KFP UI and humans."""
    esc = html.escape
    colour = "#cf222e" if report["drift"] else "#1a7f37"
    verdict = "DRIFT DETECTED" if report["drift"] else "consistent"
    rows = "".join(
        f"<tr><td>{esc(t['name'])}</td><td>{esc(t['method'])}</td><td>{t['statistic']:+.4f}</td>"
        f"<td>{t['p_value']:.3g}</td><td>{t['level']:.3g}</td><td>{_fmt(t['reference'])}</td>"
        f"<td>{_fmt(t['new'])}</td><td>{'DRIFT' if t['drift'] else 'ok'}</td></tr>"
        for t in report["tests"]
    )
    notes = "".join(
        f"<li>{esc(line.strip())}</li>" for line in summary_lines(report)[1 + len(report["tests"]) :]
    )
    image = base64.b64encode(figure).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stage1-pro drift check</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>
<h1>Drift check: <span style="color:{colour}">{verdict}</span></h1>
<p>{report["n_new"]} new images from <code>{esc(report["data"])}</code> against the {report["n_reference"]}
val_calib images of bundle <code>{esc(report["bundle_version"])}</code> ({esc(report["exit_policy"])} policy).
False-alarm rate &le; {report["level"]:g} (Bonferroni over the tests). Label-free: this checks the
certificate's exchangeability assumption on what the model outputs, not the miss rate itself.</p>
<table><tr><th>test</th><th>method</th><th>statistic</th><th>p-value</th><th>level</th><th>reference</th>
<th>new</th><th>verdict</th></tr>{rows}</table>
<ul>{notes}</ul>
<img alt="reference vs new score distributions" src="data:image/png;base64,{image}">
<p>Created {esc(report["created_at"])}.</p>
</body></html>
"""
