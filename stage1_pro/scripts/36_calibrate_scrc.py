"""Step 36: certified SCRC calibration (Pareto path by default; SCRC-I, SCRC-T) -> scrcparams.json.

Same flags and behaviour as ``stage1-pro calibrate --policy scrc``::

    python stage1_pro/scripts/36_calibrate_scrc.py --scores run/scores.npz --out run/scrcparams.json
    python stage1_pro/scripts/36_calibrate_scrc.py --run run [--target_fnr_exit 0.02] [--delta 0.1]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("calibrate", "--policy", "scrc")
