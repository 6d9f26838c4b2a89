//! Kaplan–Meier curves across three hospitals over real QUIC with secure aggregation: the
//! NCCTG lung cancer patients split by enrolling institution (tests/fixtures/lung, made by
//! scripts/survival_reference.py). With exact counts the federated curve of each sex equals
//! the pooled curve of lifelines at every event time (and its confidence interval, and the
//! log-rank test); with differential privacy on a 30-day grid every released point lies
//! within its stated error of the exact one. Both releases are in the aggregator's compliance
//! log, and `medfed aggregator statistics show` prints and plots them. A Cox model of age,
//! sex and ECOG score, each site its own stratum, fitted by Newton–Raphson over secure sums,
//! equals lifelines' `CoxPHFitter(strata=["site"])` on the pooled patients.

use std::path::Path;
use std::time::Duration;

use crate::common::{all_succeed, audit_report, fixture_federation, ok};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lung")
        .join(name)
}

fn node_config(site: &str, port: u16) -> String {
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [policy.rules]\ndatasets = [\"lung\"]\ncolumns = [\"time\", \"status\", \"sex\", \"age\"]\n\
         [reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\
         [[dataset]]\nname = \"lung\"\npath = \"{site}.csv\"\nexact_releases = [\"statistics\"]\n"
    )
}

/// One `[[statistics]]` of the lung patients by sex; `keys` adds or overrides.
fn km(id: &str, step: u32, keys: &str) -> String {
    format!(
        "[[statistics]]\nid = \"{id}\"\ndataset = \"lung\"\nmin_sites = 3\nwait_for_sites_secs = 60\n{keys}\
         [statistics.survival]\ntime = \"time\"\nevent = \"status\"\nstart = 0\nend = 1100\nstep = {step}\n\
         strata = {{ column = \"sex\", levels = [\"1\", \"2\"] }}\n"
    )
}

fn released(d: &Path, id: &str) -> serde_json::Value {
    let path = d.join(format!("out/statistics/{id}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn federated_kaplan_meier_equals_the_pooled_curve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let studies = format!(
        "{}{}",
        km("lung-exact", 1, "exact = true\n"),
        km("lung-dp", 30, "noise_multiplier = 1.5\n")
    );
    let mut procs = fixture_federation(d, &SITES, "lung", node_config, &studies);
    all_succeed(d, &mut procs, Duration::from_secs(180));

    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let exact = released(d, "lung-exact");
    assert_eq!(exact["secure_aggregation"], true, "{exact}");
    assert_eq!(exact["sites"].as_array().unwrap().len(), 3);
    let survival = &exact["release"]["survival"];
    let mut compared = 0;
    for (s, sex) in ["1", "2"].iter().enumerate() {
        let curve = &survival["strata"][s];
        let want = &reference["strata"][sex];
        assert_eq!(curve["level"], *sex);
        assert_eq!(
            curve["patients"]["value"].as_f64(),
            want["patients"].as_f64()
        );
        assert_eq!(
            curve["median"].as_f64(),
            want["median"].as_f64(),
            "median, sex {sex}"
        );
        let times: Vec<f64> = want["times"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        let points = curve["points"].as_array().unwrap();
        let last = points.last().unwrap();
        for p in points {
            // Each released point is lifelines' estimate at that time: the same time on
            // lifelines' timeline (every point here has an event or a censoring).
            let t = p["start"].as_f64().unwrap();
            let i = times
                .iter()
                .position(|x| *x == t)
                .unwrap_or_else(|| panic!("t {t}"));
            let got = p["survival"]["value"].as_f64().unwrap();
            let expect = want["survival"][i].as_f64().unwrap();
            assert!(
                (got - expect).abs() < 1e-9,
                "sex {sex}, t {t}: {got} vs lifelines {expect}"
            );
            let at_risk = want["at_risk"][i].as_f64().unwrap();
            assert_eq!(p["at_risk"]["value"].as_f64(), Some(at_risk), "t {t}");
            if let Some(ci) = p["ci"].as_array() {
                let (lo, hi) = (
                    want["ci_lower"][i].as_f64().unwrap(),
                    want["ci_upper"][i].as_f64().unwrap(),
                );
                assert!(
                    (ci[0].as_f64().unwrap() - lo).abs() < 1e-9,
                    "t {t}: {ci:?} vs {lo}"
                );
                assert!(
                    (ci[1].as_f64().unwrap() - hi).abs() < 1e-9,
                    "t {t}: {ci:?} vs {hi}"
                );
            }
            compared += 1;
        }
        // The curve stops while at least 11 stay at risk after its last point, and lists
        // nothing past it: the last point is the last lifelines time before fewer than 11
        // would be left.
        let left_after = |t: f64| {
            let i = times.iter().position(|x| *x == t).unwrap();
            let next = times.get(i + 1).copied();
            next.map_or(0.0, |n| {
                want["at_risk"][times.iter().position(|x| *x == n).unwrap()]
                    .as_f64()
                    .unwrap()
            })
        };
        let t_last = last["start"].as_f64().unwrap();
        assert!(left_after(t_last) >= 11.0, "sex {sex}: after {t_last}");
        let i_last = times.iter().position(|x| *x == t_last).unwrap();
        assert!(
            left_after(times[i_last + 1]) < 11.0,
            "sex {sex}: the curve stops early at {t_last}"
        );
        assert!(points.iter().all(|p| !p["survival"]["value"].is_null()));
        // The stratum's total of events would count the tail's: hidden.
        assert!(curve["events"]["value"].is_null());
    }
    assert!(compared > 140, "compared {compared} times");
    let lr = &survival["log_rank"];
    let want = &reference["log_rank"];
    assert!(
        (lr["chi2"].as_f64().unwrap() - want["chi2"].as_f64().unwrap()).abs() < 1e-9,
        "{lr} vs {want}"
    );
    assert!((lr["p_value"].as_f64().unwrap() - want["p_value"].as_f64().unwrap()).abs() < 1e-9);

    // The DP release on a 30-day grid: each point within its stated error of the exact
    // curve on the same grid (computed here from the pooled rows).
    let dp = released(d, "lung-dp");
    assert!(dp["release"]["privacy"]["epsilon"].as_f64().unwrap() > 0.0);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/lung.csv"),
    )
    .unwrap();
    let (header, rows) = medfed::csv_text::read(&text).unwrap();
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let (time, status, sex_col) = (col("time"), col("status"), col("sex"));
    for (s, sex) in ["1", "2"].iter().enumerate() {
        let curve = &dp["release"]["survival"]["strata"][s];
        let mut surv = 1.0;
        let mut points = 0;
        for p in curve["points"].as_array().unwrap() {
            let (start, end) = (p["start"].as_f64().unwrap(), p["end"].as_f64().unwrap());
            let in_stratum = rows.iter().filter(|r| r[sex_col] == *sex);
            let t = |r: &Vec<String>| r[time].parse::<f64>().unwrap();
            let at_risk = in_stratum.clone().filter(|r| t(r) >= start).count() as f64;
            let died = in_stratum
                .filter(|r| t(r) >= start && t(r) < end && r[status] == "1")
                .count() as f64;
            if at_risk > 0.0 {
                surv *= 1.0 - died / at_risk;
            }
            if let Some(v) = p["survival"]["value"].as_f64() {
                let err = p["survival"]["error"].as_f64().unwrap();
                assert!(
                    (v - surv).abs() <= err,
                    "sex {sex}, bin {start}: {v} ± {err}, exact {surv}"
                );
                points += 1;
            }
        }
        assert!(points >= 10, "sex {sex}: {points} points released");
    }

    // Both releases are in the aggregator's compliance log.
    let report = audit_report(
        &d.join("audit/compliance.log"),
        &d.join("audit/signing.key.pub"),
    );
    for id in ["lung-exact", "lung-dp"] {
        assert_eq!(report["studies"][id]["released"], 1, "{report}");
    }

    // The operator's view: a table and a plot.
    let svg = d.join("km.svg");
    let shown = ok(&[
        "aggregator",
        "statistics",
        "show",
        d.join("out/statistics/lung-exact.json").to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        shown.contains("log-rank test between the strata: χ² = 10.327 on 1 df, p = 0.0013"),
        "{shown}"
    );
    assert!(
        shown.contains("270") && shown.contains("426"),
        "medians: {shown}"
    );
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        svg.contains("at risk") && svg.contains("median 270"),
        "{}",
        &svg[..svg.len().min(400)]
    );
    // A noisy release says what its ± are, and gives no log-rank test.
    let shown = ok(&[
        "aggregator",
        "statistics",
        "show",
        d.join("out/statistics/lung-dp.json").to_str().unwrap(),
    ]);
    assert!(shown.contains("not computed from noisy counts"), "{shown}");
    assert!(shown.contains("differential-privacy noise"), "{shown}");
}

#[test]
fn a_federated_cox_model_equals_the_pooled_site_stratified_fit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let study = "[[statistics]]\nid = \"lung-cox\"\ndataset = \"lung\"\nexact = true\nmin_sites = 3\n\
        wait_for_sites_secs = 60\n\
        [statistics.survival]\ntime = \"time\"\nevent = \"status\"\nstart = 0\nend = 1100\nstep = 1\n\
        [statistics.cox]\ncovariates = [\"age\", \"sex\", \"ph.ecog\"]\n";
    let with_ecog =
        |site: &str, port| node_config(site, port).replace("\"age\"]", "\"age\", \"ph.ecog\"]");
    let mut procs = fixture_federation(d, &SITES, "lung", with_ecog, study);
    all_succeed(d, &mut procs, Duration::from_secs(180));

    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let want = &reference["cox"];
    let got = released(d, "lung-cox");
    let fit = &got["release"]["cox"];
    assert_eq!(fit["patients"].as_f64(), want["patients"].as_f64(), "{fit}");
    // The one patient without an ECOG score is left out, and counted.
    assert_eq!(got["release"]["count"]["value"].as_f64(), Some(227.0));
    for (k, c) in fit["coefficients"].as_array().unwrap().iter().enumerate() {
        let (coef, se) = (c["coef"].as_f64().unwrap(), c["se"].as_f64().unwrap());
        let (want_coef, want_se) = (
            want["coef"][k].as_f64().unwrap(),
            want["se"][k].as_f64().unwrap(),
        );
        assert!(
            (coef - want_coef).abs() < 1e-4,
            "{}: {coef} vs lifelines {want_coef}",
            c["covariate"]
        );
        assert!(
            (se - want_se).abs() < 1e-4,
            "{}: se {se} vs lifelines {want_se}",
            c["covariate"]
        );
        let p = want["p_value"][k].as_f64().unwrap();
        assert!(
            (c["p_value"].as_f64().unwrap() - p).abs() < 1e-4 * p.max(1e-3),
            "{c}"
        );
    }
    let ll = fit["log_likelihood"].as_f64().unwrap();
    assert!(
        (ll - want["log_likelihood"].as_f64().unwrap()).abs() < 1e-6,
        "{ll}"
    );
    let c = fit["concordance"].as_f64().unwrap();
    assert!(
        (c - want["concordance"].as_f64().unwrap()).abs() < 1e-9,
        "concordance {c}"
    );
    // Each iteration was a secure round; the release is in the compliance log.
    let iterations = fit["iterations"].as_u64().unwrap();
    assert!((3..=10).contains(&iterations), "{iterations}");
    let report = audit_report(
        &d.join("audit/compliance.log"),
        &d.join("audit/signing.key.pub"),
    );
    assert_eq!(report["studies"]["lung-cox"]["released"], 1, "{report}");
    let shown = ok(&[
        "aggregator",
        "statistics",
        "show",
        d.join("out/statistics/lung-cox.json").to_str().unwrap(),
    ]);
    assert!(
        shown.contains("ph.ecog") && shown.contains("concordance 0.6361"),
        "{shown}"
    );
}

/// An attacker's pair of exact survival queries: every patient, then every patient but the
/// one aged 82. The difference of the two curves would be that patient's follow-up time and
/// outcome; the site holding them declines the second, in words that do not depend on its
/// data, so nothing of it is released.
#[test]
fn two_exact_curves_one_patient_apart_are_not_both_answered() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let studies = format!(
        "{}{}",
        km("everyone", 30, "exact = true\n"),
        km(
            "everyone-but-one",
            30,
            "exact = true\ntimeout_secs = 10\ncohort = [{ column = \"age\", op = \"!=\", value = 82 }]\n"
        )
    );
    let mut procs = fixture_federation(d, &SITES, "lung", node_config, &studies);
    let status = crate::common::wait(&mut procs.0[0].1, Duration::from_secs(120));
    let agg_log = crate::common::log(d, "aggregator");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second query must fail:\n{agg_log}"
    );
    assert!(d.join("out/statistics/everyone.json").exists());
    assert!(!d.join("out/statistics/everyone-but-one.json").exists());
    assert!(
        agg_log.contains("this site's policy does not serve this query"),
        "{agg_log}"
    );
    assert!(!agg_log.contains("differencing"), "{agg_log}");
    let declined = SITES
        .iter()
        .filter(|s| {
            crate::common::log(d, s).contains(
                "differencing protection: its cohort differs from that of query 'everyone' by 1 patient(s)",
            )
        })
        .count();
    assert_eq!(declined, 1, "exactly the site holding the patient declines");
}
