#!/usr/bin/env python3
"""NCCTG lung cancer survival: the split into three sites that the survival tests use, and
the pooled (centralized) references they are compared with.

Run once (needs lifelines; the tests do not): `python3 scripts/survival_reference.py`.
It reads examples/data/lung.csv (`time` in days; `status` 1 = died, 0 = censored) and
writes, under tests/fixtures/lung/:

- site-a.csv, site-b.csv, site-c.csv: the patients by enrolling institution (`inst`):
  site-a institutions 1-5 and the one patient without an institution, site-b 6-13,
  site-c 15 and above;
- reference.json: lifelines' Kaplan-Meier estimate of all 228 patients per `sex`
  (1 male, 2 female): at each time of the timeline, the number at risk, the survival and
  its 95% exponential-Greenwood interval; the median; and the log-rank test of male
  against female. And lifelines' CoxPHFitter of `age`, `sex` and `ph.ecog` (Efron's ties,
  lifelines' only method) on all patients with those values, stratified by site
  (`strata=["site"]`): coefficients, standard errors, the partial log-likelihood and the
  concordance index (within strata); and the same of `age` and `sex` alone (every patient
  has both: the example's Cox cohort is then the Kaplan-Meier one, which a site's
  differencing protection requires of two exact answers one patient apart).
"""

import json
import pathlib

import lifelines
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "lung.csv"
OUT = ROOT / "tests" / "fixtures" / "lung"


def site_of(inst):
    if pd.isna(inst) or inst <= 5:
        return "site-a"
    if inst <= 13:
        return "site-b"
    return "site-c"


def main():
    text = DATA.read_text().splitlines()
    header, rows = text[0], text[1:]
    df = pd.read_csv(DATA)
    OUT.mkdir(parents=True, exist_ok=True)
    for site in ["site-a", "site-b", "site-c"]:
        mine = [r for r, inst in zip(rows, df["inst"]) if site_of(inst) == site]
        (OUT / f"{site}.csv").write_text("\n".join([header] + mine) + "\n")

    strata = {}
    for sex in [1, 2]:
        d = df[df["sex"] == sex]
        km = KaplanMeierFitter().fit(d["time"], d["status"])
        sf = km.survival_function_.iloc[:, 0]
        ci = km.confidence_interval_
        table = km.event_table
        strata[str(sex)] = {
            "patients": int(len(d)),
            "times": [float(t) for t in sf.index],
            "survival": [float(s) for s in sf.values],
            "ci_lower": [float(x) for x in ci.iloc[:, 0].values],
            "ci_upper": [float(x) for x in ci.iloc[:, 1].values],
            "at_risk": [float(table.loc[t, "at_risk"]) for t in sf.index],
            "median": float(km.median_survival_time_),
        }
    male, female = df[df["sex"] == 1], df[df["sex"] == 2]
    lr = logrank_test(male["time"], female["time"], male["status"], female["status"])
    def cox(covariates):
        data = df.assign(site=df["inst"].map(site_of))[["time", "status", "site"] + covariates].dropna()
        cph = CoxPHFitter().fit(data, "time", "status", strata=["site"])
        return {
            "covariates": covariates,
            "ties": "efron",
            "patients": int(len(data)),
            "coef": [float(cph.params_[c]) for c in covariates],
            "se": [float(cph.standard_errors_[c]) for c in covariates],
            "p_value": [float(cph.summary.loc[c, "p"]) for c in covariates],
            "log_likelihood": float(cph.log_likelihood_),
            "concordance": float(cph.concordance_index_),
        }

    reference = {
        "lifelines": lifelines.__version__,
        "strata": strata,
        "log_rank": {"chi2": float(lr.test_statistic), "p_value": float(lr.p_value)},
        "cox": cox(["age", "sex", "ph.ecog"]),
        "cox_age_sex": cox(["age", "sex"]),
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"log-rank chi2 {lr.test_statistic:.6f} p {lr.p_value:.6g}; "
          f"medians {strata['1']['median']} / {strata['2']['median']}")


if __name__ == "__main__":
    main()
