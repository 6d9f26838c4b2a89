//! Survival analysis across three hospitals, beside the pooled (centralized) reference.
//!
//! The NCCTG lung cancer patients (examples/data/lung.csv) are split by enrolling
//! institution into three hospitals. On loopback (QUIC, mutual TLS, secure aggregation)
//! the aggregator releases:
//!
//! - Kaplan–Meier curves by sex with exact counts, and the log-rank test;
//! - the same curves with differential privacy on a 30-day grid;
//! - a Cox model of age and sex, each hospital its own stratum.
//!
//! (The test `tests/integration/survival.rs` also fits age, sex and ECOG score in a
//! federation of its own. Here, one patient has no ECOG score, so that model's cohort would
//! be the Kaplan–Meier cohort less one patient: the hospital holding that patient declines
//! the second of two exact answers that differ by fewer than 11 patients, since their
//! difference is that patient.)
//!
//! ```sh
//! cargo run --release --example survival [-- --out DIR]
//! ```
//!
//! It prints each beside lifelines' figures on the pooled patients
//! (tests/fixtures/lung/reference.json, from scripts/survival_reference.py) and draws the
//! curves (`km-exact.svg`, `km-dp.svg` in the output directory).

use medfed::local;
use medfed_protocol::fedstats::StatsRelease;

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const PARTS: [&str; 3] = [
    include_str!("../tests/fixtures/lung/site-a.csv"),
    include_str!("../tests/fixtures/lung/site-b.csv"),
    include_str!("../tests/fixtures/lung/site-c.csv"),
];
const REFERENCE: &str = include_str!("../tests/fixtures/lung/reference.json");

fn km(id: &str, step: u32, keys: &str) -> String {
    format!(
        "\n[[statistics]]\nid = \"{id}\"\ndataset = \"lung\"\nmin_sites = 3\n{keys}\
         [statistics.survival]\ntime = \"time\"\nevent = \"status\"\nstart = 0\nend = 1100\nstep = {step}\n\
         strata = {{ column = \"sex\", levels = [\"1\", \"2\"] }}\n"
    )
}

fn main() -> anyhow::Result<()> {
    let out = local::out_dir("survival")?;
    let statistics = format!(
        "{}{}\n[[statistics]]\nid = \"lung-cox\"\ndataset = \"lung\"\nexact = true\nmin_sites = 3\n\
         [statistics.survival]\ntime = \"time\"\nevent = \"status\"\nstart = 0\nend = 1100\nstep = 1\n\
         [statistics.cox]\ncovariates = [\"age\", \"sex\"]\n",
        km("lung-exact", 1, "exact = true\n"),
        km("lung-dp", 30, "noise_multiplier = 1.5\n"),
    );
    let columns: Vec<String> = ["time", "status", "sex", "age"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let parts: Vec<String> = PARTS.iter().map(|p| p.to_string()).collect();
    let (agg, nodes) =
        local::exact_statistics_federation(&out, &SITES, "lung", &parts, &columns, &statistics)?;
    println!(
        "survival: 1 aggregator + 3 hospitals on loopback (secure aggregation); files in {}",
        out.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(local::federate(&agg, &nodes, |_| {}))?;

    let reference: serde_json::Value = serde_json::from_str(REFERENCE)?;
    let release = |id: &str| -> anyhow::Result<StatsRelease> {
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            out.join(format!("out/statistics/{id}.json")),
        )?)?;
        Ok(serde_json::from_value(file["release"].clone())?)
    };

    // Kaplan–Meier, exact: the federated curve against lifelines' at every event time.
    let exact = release("lung-exact")?;
    let survival = exact
        .survival
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no survival curves released"))?;
    println!("\nKaplan–Meier by sex, exact counts (lifelines on the pooled patients beside):");
    let mut worst: f64 = 0.0;
    for (curve, sex) in survival.strata.iter().zip(["1", "2"]) {
        let want = &reference["strata"][sex];
        let times = want["times"].as_array().map_or(&[][..], |v| v.as_slice());
        // Each released point beside lifelines' estimate at the same time.
        for p in &curve.points {
            let at = times.iter().position(|t| t.as_f64() == Some(p.start));
            let (Some(i), Some(got)) = (at, p.survival.value) else {
                worst = f64::INFINITY;
                continue;
            };
            if let Some(s) = want["survival"][i].as_f64() {
                worst = worst.max((got - s).abs());
            }
        }
        println!(
            "  sex {sex}: {} patients, median {} days (lifelines {})",
            curve.patients.value.unwrap_or(f64::NAN),
            curve.median.map_or("not reached".into(), |m| m.to_string()),
            want["median"]
        );
    }
    println!("  largest difference from lifelines' curve at any released time: {worst:.1e}");
    if let Some(lr) = &survival.log_rank {
        println!(
            "  log-rank: χ² = {:.4} (lifelines {:.4}), p = {:.5} (lifelines {:.5})",
            lr.chi2,
            reference["log_rank"]["chi2"].as_f64().unwrap_or(f64::NAN),
            lr.p_value,
            reference["log_rank"]["p_value"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }

    // Cox: coefficients and standard errors against lifelines (strata = site).
    let cox = release("lung-cox")?;
    let fit = cox
        .cox
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no Cox model released"))?;
    println!(
        "\nCox model, each hospital its own stratum, Efron ties ({} iterations):",
        fit.iterations
    );
    println!(
        "  {:<10} {:>10} {:>12} {:>10} {:>12}",
        "covariate", "coef", "lifelines", "se", "lifelines"
    );
    for (k, c) in fit.coefficients.iter().enumerate() {
        println!(
            "  {:<10} {:>10.6} {:>12.6} {:>10.6} {:>12.6}",
            c.covariate,
            c.coef,
            reference["cox_age_sex"]["coef"][k]
                .as_f64()
                .unwrap_or(f64::NAN),
            c.se,
            reference["cox_age_sex"]["se"][k]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    println!(
        "  concordance {:.6} (lifelines {:.6})",
        fit.concordance.unwrap_or(f64::NAN),
        reference["cox_age_sex"]["concordance"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );

    // The plots, as `medfed aggregator statistics show --plot` draws them.
    for (id, file) in [("lung-exact", "km-exact.svg"), ("lung-dp", "km-dp.svg")] {
        let r = release(id)?;
        let Some(s) = &r.survival else { continue };
        let curves: Vec<medfed::plots::SurvivalCurve<'_>> = s
            .strata
            .iter()
            .map(|c| {
                let name = if c.level.as_deref() == Some("1") {
                    "male"
                } else {
                    "female"
                };
                let n = c
                    .patients
                    .value
                    .map_or("n suppressed".into(), |n| format!("n = {n:.0}"));
                let median = c
                    .median
                    .map_or("median not reached".into(), |m| format!("median {m}"));
                (format!("{name} ({n}, {median})"), name.to_string(), c)
            })
            .collect();
        let title = match &s.log_rank {
            Some(lr) => format!(
                "NCCTG lung, 3 hospitals, exact: log-rank p = {:.4}",
                lr.p_value
            ),
            None => "NCCTG lung, 3 hospitals, differential privacy (z = 1.5), 30-day bins".into(),
        };
        let note = if s.noisy {
            "Bands: 95% Greenwood intervals widened to the noise's stated error. Curves stop below 11 at risk."
        } else {
            "Bands: 95% Greenwood intervals. Curves stop where fewer than 11 patients are at risk."
        };
        let path = out.join(file);
        medfed::plots::survival_curves(&path, &title, "days", &curves, note)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!("plot: {}", path.display());
    }
    if worst > 1e-9 {
        anyhow::bail!("the exact federated curve differs from lifelines' by {worst}");
    }
    Ok(())
}
