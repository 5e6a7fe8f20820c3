"""End to end, through the CLI: scores -> calibrate (each policy) -> validate -> export -> publish
(fake-gcs-server) -> pull -> predict.

Two comparisons per policy, both against the policy file of the *run* read back independently:

1. on the scores: the pulled bundle's predictor decides the test split exactly as the policy does
   (and as validation.json counted);
2. on real images through a real (tiny) network: ``stage1-pro predict --json`` gives the
   decisions that ``policy.decide`` gives on the probabilities of a bare forward pass of the
   run's own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import make_run

from stage1_pro.artifacts import read_artifact
from stage1_pro.bundle import POLICY_FILES, verify_bundle
from stage1_pro.cli import main
from stage1_pro.inference import load_bundle
from stage1_pro.models import load_model
from stage1_pro.policies import load_policy
from stage1_pro.preprocessing import PreprocessSpec, preprocess
from stage1_pro.scores import load_scores

pytestmark = pytest.mark.slow

CASES = {
    "softmax": [],
    "gate": ["--calibrator", "platt"],
    "scrc": ["--selection-score", "gate"],
}


def cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("policy", list(CASES))
def test_scores_to_predictions(
    policy: str,
    bundle_model_dir: Path,
    bundle_images: list[Path],
    gcs_emulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = make_run(tmp_path / "run", bundle_model_dir, policy=policy, calibrate=False)
    assert cli("calibrate", "--run", run, "--policy", policy, *CASES[policy]) == 0
    assert cli("validate", "--run", run) == 0  # blessed
    assert cli("export", "--run", run, "--out", tmp_path / "bundle", "--version", f"{policy}-1") == 0
    prefix = gcs_emulator.make_bucket() + "/bundles/stage1"
    assert cli("publish", tmp_path / "bundle", prefix) == 0
    assert cli("pull", prefix, tmp_path / "pulled") == 0
    capsys.readouterr()

    pulled = tmp_path / "pulled"
    meta = verify_bundle(pulled)
    assert meta["version"] == f"{policy}-1" and meta["active_exit_policy"] == policy and meta["blessed"]
    policy_file = POLICY_FILES[policy]
    assert (pulled / policy_file).read_bytes() == (run / policy_file).read_bytes()
    reference = load_policy(run / policy_file)  # read back from the run, independently of the bundle
    predictor = load_bundle(pulled)

    # 1. the scores' test split
    test = load_scores(str(run / "scores.npz")).subset("test")
    want = np.asarray(reference.decide(test.probs, test.gate_logit))
    got = np.array([p.decision for p in predictor.decide(test.probs, test.gate_logit)])
    np.testing.assert_array_equal(got, want)
    assert set(want.tolist()) == {-1, 0, 1}
    matrix = np.array(read_artifact(pulled / "validation.json", "validation")["confusion"]["matrix"])
    assert matrix.sum(axis=0).tolist() == [int((want == d).sum()) for d in (0, 1, -1)]

    # 2. real images through the network
    assert cli("predict", "--bundle", pulled, "--json", "--batch-size", "16", *bundle_images) == 0
    rows = json.loads(capsys.readouterr().out)
    model = load_model(run)
    with torch.no_grad():
        out = model(
            preprocess(
                PreprocessSpec.from_model_info(read_artifact(run / "model.json", "model")), bundle_images
            )
        )
    probs = torch.softmax(out["logits"], dim=1).numpy().astype(np.float64)
    gate = out["gate_logit"].numpy().astype(np.float64)
    expected = np.asarray(reference.decide(probs, gate))
    names = {1: "exit-positive", 0: "exit-negative", -1: "defer"}
    assert [r["decision"] for r in rows] == [names[int(d)] for d in expected]
    assert [r["source"] for r in rows] == [str(p) for p in bundle_images]
    np.testing.assert_allclose([r["p_positive"] for r in rows], probs[:, 1], atol=1e-5)
    assert len(set(expected.tolist())) >= 2, "the tiny network should give mixed decisions"
