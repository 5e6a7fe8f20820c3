"""Step 0: make ``splits.json`` (same function as ``stage1-pro split``).

Usage: python stage1_pro/scripts/00_make_splits.py --data MANIFEST_OR_FOLDER --out splits.json [--seed N]
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("split")
