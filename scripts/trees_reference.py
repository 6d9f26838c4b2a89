#!/usr/bin/env python3
"""Wisconsin breast cancer: the split the boosted-trees test uses, and the centralized
histogram GBDT it is compared with.

Run once (needs scikit-learn; the test does not): `python3 scripts/trees_reference.py`.
It reads examples/data/breast_cancer_wisconsin.csv (569 rows, 30 features, `diagnosis`
malignant/benign) and writes, under tests/fixtures/breast_cancer/:

- holdout.csv: 30% of each class (rows 0, 3 and 6 of every 10 of the class, in file order);
- site-a.csv, site-b.csv, site-c.csv: the other rows, dealt in turn (row k to site k mod 3);
- reference.json: each feature's bounds (its minimum and maximum over the whole file, which
  the federated model's bins are declared with), the settings, and the held-out ROC AUC of
  scikit-learn's HistGradientBoostingClassifier trained on the three sites' rows pooled
  with the same trees, depth, bins, learning rate, L2 penalty and smallest leaf, no early
  stopping; and its probability of malignant for each held-out row, in file order.
"""

import csv
import json
import pathlib

import numpy as np
import sklearn
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "breast_cancer_wisconsin.csv"
OUT = ROOT / "tests" / "fixtures" / "breast_cancer"
SETTINGS = {"trees": 50, "depth": 3, "learning_rate": 0.1, "max_bins": 32, "l2": 0.0,
            "min_child_samples": 20}


def main():
    with open(DATA, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    target = header.index("diagnosis")
    features = [h for h in header if h != "diagnosis"]
    holdout, rest = [], []
    seen = {}
    for r in rows:
        k = seen.get(r[target], 0)
        seen[r[target]] = k + 1
        (holdout if k % 10 in (0, 3, 6) else rest).append(r)
    OUT.mkdir(parents=True, exist_ok=True)

    def write(name, part):
        with open(OUT / name, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(part)

    write("holdout.csv", holdout)
    for s, site in enumerate(["site-a", "site-b", "site-c"]):
        write(f"{site}.csv", rest[s::3])

    def xy(part):
        x = np.array([[float(r[i]) for i, h in enumerate(header) if h != "diagnosis"] for r in part])
        y = np.array([1 if r[target] == "malignant" else 0 for r in part])
        return x, y

    x_all, _ = xy(rows)
    bounds = [{"name": n, "low": float(np.floor(x_all[:, j].min() * 1000) / 1000),
               "high": float(np.ceil(x_all[:, j].max() * 1000) / 1000)} for j, n in enumerate(features)]
    x, y = xy(rest)
    xh, yh = xy(holdout)
    model = HistGradientBoostingClassifier(
        max_iter=SETTINGS["trees"], max_depth=SETTINGS["depth"],
        learning_rate=SETTINGS["learning_rate"], max_bins=SETTINGS["max_bins"],
        l2_regularization=SETTINGS["l2"], min_samples_leaf=SETTINGS["min_child_samples"],
        max_leaf_nodes=None, early_stopping=False, random_state=0,
    ).fit(x, y)
    auc = roc_auc_score(yh, model.predict_proba(xh)[:, 1])
    reference = {
        "sklearn": sklearn.__version__,
        "settings": SETTINGS,
        "features": bounds,
        "training_rows": len(rest),
        "holdout_rows": len(holdout),
        "holdout_auc": auc,
        "holdout_scores": [float(p) for p in model.predict_proba(xh)[:, 1]],
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"held-out AUC {auc:.4f} ({len(rest)} training rows, {len(holdout)} held out)")


if __name__ == "__main__":
    main()
