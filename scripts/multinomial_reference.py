#!/usr/bin/env python3
"""Reaven & Miller's three-class diabetes data: the split the federated test uses, and the
centralized reference it is compared with.

Run once (needs scikit-learn; the test does not): `python3 scripts/multinomial_reference.py`.
It reads examples/data/reaven_miller_diabetes.csv and writes, under
tests/fixtures/reaven_miller/:

- holdout.csv: 30% of each class (rows 0, 3 and 6 of every 10 of the class, in file order);
- site-a.csv, site-b.csv, site-c.csv: the other rows, dealt in turn (row k to site k mod 3);
- reference.json: scikit-learn's multinomial LogisticRegression (lbfgs) trained on the three
  sites' rows pooled, standardized by their mean and (population) standard deviation, with
  the penalty of medfed's training objective: mean cross-entropy + l2/2 ||W||^2 (intercepts
  not penalised) is scikit-learn's with C = 1 / (n * l2). Evaluated on holdout.csv: the
  macro one-vs-rest ROC AUC (roc_auc_score(multi_class="ovr", average="macro")), accuracy
  and log loss.
"""

import csv
import json
import pathlib

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "reaven_miller_diabetes.csv"
OUT = ROOT / "tests" / "fixtures" / "reaven_miller"
FEATURES = ["relwt", "glufast", "glutest", "instest", "sspg"]
TARGET = "group"
CLASSES = ["Normal", "Chemical_Diabetic", "Overt_Diabetic"]
L2 = 0.01  # the study's [study.training] l2 (medfed's default)


def main():
    with DATA.open() as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    seen = {c: 0 for c in CLASSES}
    holdout, rest = [], []
    for r in rows:
        j = seen[r[TARGET]]
        seen[r[TARGET]] += 1
        (holdout if j % 10 in (0, 3, 6) else rest).append(r)
    sites = {s: [] for s in ("site-a", "site-b", "site-c")}
    for k, r in enumerate(rest):
        sites[list(sites)[k % 3]].append(r)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in [("holdout", holdout)] + list(sites.items()):
        with (OUT / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
            w.writeheader()
            w.writerows(part)

    def xy(part):
        x = np.array([[float(r[c]) for c in FEATURES] for r in part])
        y = np.array([CLASSES.index(r[TARGET]) for r in part])
        return x, y

    x, y = xy(rest)
    mean, std = x.mean(axis=0), x.std(axis=0)
    n = len(y)
    model = LogisticRegression(C=1.0 / (n * L2), solver="lbfgs", max_iter=10_000, tol=1e-10)
    model.fit((x - mean) / std, y)
    xh, yh = xy(holdout)
    p = model.predict_proba((xh - mean) / std)
    reference = {
        "what": "scikit-learn multinomial LogisticRegression(lbfgs) on the three sites' rows "
        "pooled, standardized by their mean and population std, C = 1/(n*l2); metrics on holdout.csv",
        "sklearn": sklearn.__version__,
        "training_rows": n,
        "holdout_rows": len(yh),
        "l2": L2,
        "C": 1.0 / (n * L2),
        "classes": CLASSES,
        "macro_auc": roc_auc_score(yh, p, multi_class="ovr", average="macro"),
        "per_class_auc": [roc_auc_score(yh == c, p[:, c]) for c in range(len(CLASSES))],
        "accuracy": accuracy_score(yh, p.argmax(axis=1)),
        "log_loss": log_loss(yh, p, labels=list(range(len(CLASSES)))),
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    print(json.dumps(reference, indent=2))


if __name__ == "__main__":
    main()
