"""Step 20: train one phase (same flags and function as ``stage1-pro train``)::

    python stage1_pro/scripts/20_train.py --phase 1 --exit_policy softmax \
        --data demo/manifest.csv --splits splits.json --out runs/p1
"""

from stage1_pro.cli import run_verb

if __name__ == "__main__":
    run_verb("train")
