"""Step 50: export a validated run directory as a deployable bundle.

Same flags and behaviour as ``stage1-pro export``::

    python stage1_pro/scripts/50_export_bundle.py --run runs/exp1 --out bundles/exp1 [--allow-unblessed]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("export")
