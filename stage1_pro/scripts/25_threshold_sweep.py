"""Step 25: certified softmax threshold sweep -> thresholds.json.

Same flags and behaviour as ``stage1-pro calibrate --policy softmax``::

    python stage1_pro/scripts/25_threshold_sweep.py --scores run/scores.npz --out run/thresholds.json
    python stage1_pro/scripts/25_threshold_sweep.py --run run [--target_fnr_exit 0.02] [--delta 0.1]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("calibrate", "--policy", "softmax")
