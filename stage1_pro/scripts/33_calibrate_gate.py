"""Step 33: certified Platt/isotonic gate calibration -> gateparams.json.

Same flags and behaviour as ``stage1-pro calibrate --policy gate``::

    python stage1_pro/scripts/33_calibrate_gate.py --scores run/scores.npz --out run/gateparams.json
    python stage1_pro/scripts/33_calibrate_gate.py --run run [--target_fnr_exit 0.02] [--delta 0.1]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("calibrate", "--policy", "gate")
