//! Attacks on patients' privacy, each made with nothing but the aggregator operator's
//! ordinary power (writing statistics studies), against real processes: three hospitals on
//! the DEFAULT node policy (rules that name the dataset and its columns, an identifier
//! column listed by mistake, no exact releases, the default privacy budget), talking QUIC
//! with mutual TLS and secure aggregation.
//!
//! Every attack is first run for real; what it recovers is then judged statistically: the
//! same queries are released many times over with the very code the nodes and the
//! aggregator run (each site's vector, its discrete Gaussian share of the noise on the
//! secure-aggregation grid, the decoded sum, the release), in two worlds that differ in the
//! target patient only, and the attacker (who knows every other patient) guesses which
//! world it is in. Each test asserts the guess is right no more often than differential
//! privacy allows for what was spent: the Gaussian mechanism's exact bound (Neyman–Pearson:
//! Φ(μ/2), μ the two worlds' distance in noise units), which at the default noise
//! multiplier keeps a three-query attacker well short of certainty.
//!
//! The opt-in exact mode (`exact_releases = ["statistics"]`) is attacked too, where its
//! own protections (complementary suppression, site-set differencing) must hold.

use std::path::Path;
use std::time::Duration;

use medfed_protocol::fedstats::{Condition, StatsQuery};
use medfed_protocol::quant::QuantParams;
use rand::SeedableRng;

use crate::common::{
    Processes, RECONNECT_FAST, aggregator_config, approve_exact_queries, free_udp_port,
    node_config_with, pima, pki, spawn_aggregator, spawn_node, wait,
};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// The default node policy, but for the rules: the dataset and its columns (and, by the
/// operator's mistake, an SSN column).
const RULES: &str = "[policy.rules]\ndatasets = [\"pima\"]\n\
    columns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\", \"ssn\"]\n";

/// The columns every attack query asks about, as TOML and as the protocol's query.
const COLUMNS: &str = "[[statistics.column]]\nname = \"glu\"\nlow = 40\nhigh = 200\nedges = [40, 100, 140, 200]\n\
    [[statistics.column]]\nname = \"bmi\"\nlow = 15\nhigh = 70\nedges = [15, 25, 30, 35, 40, 70]\n";

/// The secure aggregation the aggregator sets up with its defaults: tolerating c = 1
/// colluder, the threshold for n sites is (n + c)/2 + 1 (3 for three sites, 2 for two), on
/// a fixed point of 2^-24 units.
const COLLUDERS: u32 = 1;
const GRID_BITS: u8 = 24;

fn threshold(sites: usize) -> u32 {
    (sites as u32 + COLLUDERS) / 2 + 1
}

/// One synthetic SSN per row, so that a query can name a patient.
fn ssn(row: usize) -> String {
    format!(
        "{:03}-{:02}-{:04}",
        100 + row % 800,
        10 + row % 80,
        1000 + row
    )
}

/// The Pima rows (with an `ssn` column) split across the sites, row by row; PKI and node
/// configs in `d`.
fn federation(d: &Path) -> Vec<Vec<String>> {
    pki(d, &SITES);
    let (header, rows) = pima();
    let rows: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{r},{}", ssn(i)))
        .collect();
    let mut parts = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let part: Vec<String> = rows.iter().skip(i).step_by(3).cloned().collect();
        std::fs::write(
            d.join(format!("{site}.csv")),
            format!("{header},ssn\n{}\n", part.join("\n")),
        )
        .unwrap();
        parts.push(part);
    }
    parts
}

/// Runs an aggregator with `statistics` (TOML) for `sites`, and those sites' nodes, until
/// the aggregator exits: whether it succeeded, and its log. With `dataset` keys (an exact
/// opt-in), each site's operator approves the exact queries one by one first.
fn run(d: &Path, name: &str, sites: &[&str], statistics: &str, dataset: &str) -> (bool, String) {
    run_with_rules(d, name, sites, statistics, dataset, "", !dataset.is_empty())
}

/// As [`run`], with `rules` appended to the nodes' `[policy.rules]`; `approve_exact` says
/// whether the operators approve the exact queries by hash.
fn run_with_rules(
    d: &Path,
    name: &str,
    sites: &[&str],
    statistics: &str,
    dataset: &str,
    rules: &str,
    approve_exact: bool,
) -> (bool, String) {
    let port = free_udp_port();
    let out = format!("out-{name}");
    std::fs::write(
        d.join(format!("{name}.toml")),
        aggregator_config(port, Some(&out), sites, statistics),
    )
    .unwrap();
    let mut procs = Processes(Vec::new());
    let cfg = d.join(format!("{name}.toml"));
    let mut nodes = Vec::new();
    for site in sites {
        let node = d.join(format!("{site}-{name}.toml"));
        std::fs::write(
            &node,
            node_config_with(
                site,
                port,
                &format!("{site}.csv"),
                dataset,
                &format!("{RULES}{rules}{RECONNECT_FAST}"),
            ),
        )
        .unwrap();
        nodes.push(node);
    }
    if approve_exact {
        approve_exact_queries(&cfg, &nodes);
    }
    procs.0.push(spawn_aggregator(d, name, &cfg));
    for (site, cfg) in sites.iter().zip(&nodes) {
        procs.0.push(spawn_node(d, &format!("{site}-{name}"), cfg));
    }
    let status = wait(&mut procs.0[0].1, Duration::from_secs(180));
    let log = std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap();
    assert!(
        status.is_some(),
        "{name}: the aggregator did not finish:\n{log}"
    );
    (status.is_some_and(|s| s.success()), log)
}

/// A released statistics file of run `name`, if the study was released.
fn release(d: &Path, name: &str, id: &str) -> Option<serde_json::Value> {
    let path = d.join(format!("out-{name}/statistics/{id}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

fn statistics(id: &str, cohort: &str, min_sites: usize, extra: &str) -> String {
    format!(
        "[[statistics]]\nid = \"{id}\"\ndataset = \"pima\"\ncohort = [{cohort}]\nmin_sites = {min_sites}\n\
         timeout_secs = 20\nwait_for_sites_secs = 60\n{extra}{COLUMNS}"
    )
}

/// The protocol's query for a cohort, as the aggregator builds it from [`statistics`].
fn query(id: &str, cohort: Vec<Condition>) -> StatsQuery {
    let column =
        |name: &str, low: f64, high: f64, edges: &[f64]| medfed_protocol::fedstats::StatColumn {
            name: name.into(),
            low,
            high,
            edges: edges.to_vec(),
        };
    StatsQuery {
        query_id: id.into(),
        dataset: "pima".into(),
        cohort,
        columns: vec![
            column("glu", 40.0, 200.0, &[40.0, 100.0, 140.0, 200.0]),
            column("bmi", 15.0, 70.0, &[15.0, 25.0, 30.0, 35.0, 40.0, 70.0]),
        ],
        correlations: false,
        // The aggregator's default.
        noise_multiplier: Some(1.5),
        suppress_below: 11,
        survival: None,
        cox: None,
        trees: None,
    }
}

/// (glu, bmi, type, ssn) of a CSV row of the federation.
fn fields(row: &str) -> (f64, f64, String, String) {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(row.as_bytes());
    let f = r.records().next().unwrap().unwrap();
    (
        f[1].parse().unwrap(),
        f[4].parse().unwrap(),
        f[7].to_string(),
        f[8].to_string(),
    )
}

/// What one release of `q` at one site would be: the rows of its cohort.
fn cohort_rows(q: &StatsQuery, rows: &[(f64, f64, String)]) -> Vec<Vec<f64>> {
    rows.iter()
        .filter(|(glu, _, ty)| {
            q.cohort.iter().all(|c| match c.column.as_str() {
                "glu" => c.holds(&glu.to_string()),
                "type" => c.holds(ty),
                _ => true,
            })
        })
        .map(|(glu, bmi, _)| vec![*glu, *bmi])
        .collect()
}

/// One release of `q` over `sites` (each a list of rows), as secure aggregation decodes it:
/// each site's vector with the node's own noise share on the grid, summed modulo 2^64.
fn noisy_sum(
    q: &StatsQuery,
    sites: &[Vec<Vec<f64>>],
    rng: &mut rand_chacha::ChaCha20Rng,
) -> Vec<f64> {
    let n = sites.len();
    let quant = QuantParams::for_parties(n, 1e9, GRID_BITS).unwrap();
    let share = q
        .site_share_sigma(GRID_BITS, threshold(n), COLLUDERS)
        .unwrap();
    let mut sum = vec![0u64; q.dimension()];
    for rows in sites {
        let words = quant.encode_noised(&q.encode(rows), share, n, rng).unwrap();
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(w) & quant.mask();
        }
    }
    quant.decode(&sum)
}

/// Φ, the standard normal distribution function.
fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Scores an attacker over `trials` releases in each of two worlds: `guess` sees the
/// released sums of the queries and answers whether it is in world B. Returns the share
/// of right guesses and the best any attacker could do (Φ(μ/2), μ the worlds' distance
/// over all the queries' noise).
fn score(
    queries: &[StatsQuery],
    world_a: &[Vec<Vec<f64>>],
    world_b: &[Vec<Vec<f64>>],
    guess: impl Fn(&[Vec<f64>]) -> bool,
    trials: usize,
) -> (f64, f64) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(17);
    let mut right = 0;
    for t in 0..trials {
        let (world, b) = if t % 2 == 0 {
            (world_a, false)
        } else {
            (world_b, true)
        };
        let sums: Vec<Vec<f64>> = queries
            .iter()
            .map(|q| {
                let sites: Vec<Vec<Vec<f64>>> =
                    world.iter().map(|rows| cohort_rows_of(q, rows)).collect();
                noisy_sum(q, &sites, &mut rng)
            })
            .collect();
        if guess(&sums) == b {
            right += 1;
        }
    }
    // The Gaussian mechanism's bound: the worlds' vectors differ by Δ_q per query; the sum's
    // noise per entry has standard deviation σ_q = share·√n.
    let n = world_a.len() as f64;
    let mu2: f64 = queries
        .iter()
        .map(|q| {
            let enc = |w: &[Vec<Vec<f64>>]| -> Vec<f64> {
                let mut v = vec![0.0; q.dimension()];
                for rows in w {
                    for (s, x) in v.iter_mut().zip(q.encode(&cohort_rows_of(q, rows))) {
                        *s += x;
                    }
                }
                v
            };
            let (a, b) = (enc(world_a), enc(world_b));
            let d2: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
            let share = q
                .site_share_sigma(GRID_BITS, threshold(world_a.len()), COLLUDERS)
                .unwrap();
            let sd = share * n.sqrt();
            d2 / (sd * sd)
        })
        .sum();
    (right as f64 / trials as f64, phi(mu2.sqrt() / 2.0))
}

/// The rows of `q`'s cohort among a site's rows given as (glu, bmi, diabetic: 1/0).
fn cohort_rows_of(q: &StatsQuery, rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let typed: Vec<(f64, f64, String)> = rows
        .iter()
        .map(|r| {
            (
                r[0],
                r[1],
                if r[2] == 1.0 { "Yes" } else { "No" }.to_string(),
            )
        })
        .collect();
    cohort_rows(q, &typed)
}

/// Asserts the attacker does no better than the bound (within 3 standard errors), and that
/// the bound leaves it far from certain (an exact release would let it be right every
/// time).
fn assert_fails(what: &str, (rate, bound): (f64, f64), trials: usize) {
    let se = (0.25 / trials as f64).sqrt();
    println!(
        "{what}: the attacker is right {:.1}% of the time; the Gaussian mechanism allows at most {:.1}%",
        100.0 * rate,
        100.0 * bound
    );
    assert!(
        rate <= bound + 3.0 * se,
        "{what}: right {rate}, above the bound {bound}"
    );
    assert!(
        bound < 0.75 && rate < 0.75,
        "{what}: right {rate} (bound {bound})"
    );
}

/// The sites' rows as (glu, bmi, diabetic) triples, from the CSV rows.
fn triples(parts: &[Vec<String>]) -> Vec<Vec<Vec<f64>>> {
    parts
        .iter()
        .map(|p| {
            p.iter()
                .map(|r| {
                    let (glu, bmi, ty, _) = fields(r);
                    vec![glu, bmi, f64::from(u8::from(ty == "Yes"))]
                })
                .collect()
        })
        .collect()
}

/// The patient with a glucose value nobody else has: (site, row in site, glu).
fn lone_patient(parts: &[Vec<String>]) -> (usize, usize, f64) {
    let all: Vec<f64> = parts.iter().flatten().map(|r| fields(r).0).collect();
    for (s, p) in parts.iter().enumerate() {
        for (i, r) in p.iter().enumerate() {
            let glu = fields(r).0;
            if all.iter().filter(|g| **g == glu).count() == 1 {
                return (s, i, glu);
            }
        }
    }
    panic!("no patient with a unique glucose value")
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Denning's tracker: `glu <= v`, `glu >= v` and all rows are ordinary queries, and
/// `q1 + q2 − q3` is the record of the one patient with glucose v. All three are answered
/// (refusing clever queries is not the defence); the noise hides the patient.
#[test]
fn the_three_query_tracker_recovers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    let (site, row, v) = lone_patient(&parts);
    let (_, bmi, _, _) = fields(&parts[site][row]);
    let studies = format!(
        "{}{}{}",
        statistics(
            "le",
            &format!("{{ column = \"glu\", op = \"<=\", value = {v} }}"),
            3,
            ""
        ),
        statistics(
            "ge",
            &format!("{{ column = \"glu\", op = \">=\", value = {v} }}"),
            3,
            ""
        ),
        statistics("all", "", 3, ""),
    );
    let (ok, log) = run(d, "tracker", &SITES, &studies, "");
    assert!(ok, "every query is answered:\n{log}");
    let r: Vec<serde_json::Value> = ["le", "ge", "all"]
        .iter()
        .map(|id| release(d, "tracker", id).expect("released"))
        .collect();
    for x in &r {
        assert!(num(&x["release"]["privacy"]["epsilon"]) > 0.0, "{x}");
        assert!(num(&x["release"]["noise_sd_units"]) > 0.0, "{x}");
    }
    let track = |f: &dyn Fn(&serde_json::Value) -> f64| f(&r[0]) + f(&r[1]) - f(&r[2]);
    let count = track(&|x| num(&x["release"]["count"]["value"]));
    let bmi_sum = track(&|x| num(&x["release"]["columns"][1]["sum"]["value"]));
    println!("tracker over QUIC: count {count:.2} (exact 1), bmi sum {bmi_sum:.1} (exact {bmi})");
    // What the three releases say of their own noise: the reconstruction's standard
    // deviation is wider than the whole range of a BMI.
    let sd = (r
        .iter()
        .map(|x| num(&x["release"]["noise_sd_units"]).powi(2))
        .sum::<f64>())
    .sqrt();
    assert!(sd * 70.0 > 70.0 - 15.0, "reconstruction sd {sd} units");

    // Judged statistically: is the patient's BMI 25 or 40?
    let qs = [
        query("le", vec![cond("glu", "<=", v)]),
        query("ge", vec![cond("glu", ">=", v)]),
        query("all", vec![]),
    ];
    let (a, b) = worlds(&parts, site, row, |p| p[1] = 25.0, |p| p[1] = 40.0);
    let trials = 600;
    let guess = |s: &[Vec<f64>]| {
        // bmi sum is entry 1 + (2 + 3) + 0 = 6, in units of 70.
        (s[0][6] + s[1][6] - s[2][6]) * 70.0 > 32.5
    };
    assert_fails("tracker on BMI", score(&qs, &a, &b, guess, trials), trials);
}

fn cond(column: &str, op: &str, value: f64) -> Condition {
    serde_json::from_value(serde_json::json!({"column": column, "op": op, "value": value})).unwrap()
}

fn text_cond(column: &str, op: &str, text: &str) -> Condition {
    serde_json::from_value(serde_json::json!({"column": column, "op": op, "text": text})).unwrap()
}

/// Every site's rows, each (glu, bmi, diabetic).
type World = Vec<Vec<Vec<f64>>>;

/// The sites' rows in two worlds that differ only in the target patient (`site`, `row`).
fn worlds(
    parts: &[Vec<String>],
    site: usize,
    row: usize,
    a: impl Fn(&mut Vec<f64>),
    b: impl Fn(&mut Vec<f64>),
) -> (World, World) {
    let base = triples(parts);
    let (mut wa, mut wb) = (base.clone(), base);
    a(&mut wa[site][row]);
    b(&mut wb[site][row]);
    (wa, wb)
}

/// The refusal-pair probe: `diabetic and glu != v` beside `non-diabetic and glu != v`.
/// Today's default answers both (no refusal depends on the data), so nothing is learnt
/// from which one is refused; the counts' difference is noise.
#[test]
fn a_refusal_pair_probe_learns_no_diagnosis() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    let (site, row, v) = lone_patient(&parts);
    let studies = format!(
        "{}{}",
        statistics(
            "yes",
            &format!(
                "{{ column = \"type\", op = \"==\", text = \"Yes\" }}, {{ column = \"glu\", op = \"!=\", value = {v} }}"
            ),
            3,
            ""
        ),
        statistics(
            "no",
            &format!(
                "{{ column = \"type\", op = \"==\", text = \"No\" }}, {{ column = \"glu\", op = \"!=\", value = {v} }}"
            ),
            3,
            ""
        ),
    );
    let (ok, log) = run(d, "probe", &SITES, &studies, "");
    assert!(
        ok,
        "both queries are answered: no refusal depends on the data\n{log}"
    );
    assert!(release(d, "probe", "yes").is_some() && release(d, "probe", "no").is_some());
    for s in SITES {
        let node = std::fs::read_to_string(d.join(format!("{s}-probe.log"))).unwrap();
        assert!(
            !node.contains("declining") && !node.contains("refusing"),
            "{s}:\n{node}"
        );
    }
    // Statistically: with the patient diabetic or not, the attacker compares the counts of
    // the two cohorts with everyone else's (known to it) and guesses.
    let qs = [
        query(
            "yes",
            vec![text_cond("type", "==", "Yes"), cond("glu", "!=", v)],
        ),
        query(
            "no",
            vec![text_cond("type", "==", "No"), cond("glu", "!=", v)],
        ),
        // The same cohorts without the "!= v" exclusion: the tracker's complement.
        query("yes-all", vec![text_cond("type", "==", "Yes")]),
    ];
    let (a, b) = worlds(&parts, site, row, |p| p[2] = 0.0, |p| p[2] = 1.0);
    let trials = 600;
    // Diabetic: the "yes" cohort without the patient is one smaller than all diabetics.
    let guess = |s: &[Vec<f64>]| s[2][0] - s[0][0] > 0.5;
    assert_fails(
        "refusal pair on the diagnosis",
        score(&qs, &a, &b, guess, trials),
        trials,
    );
}

/// A count beside a histogram gives a hidden bin back (446 − (60 + 100 + 143 + 142) = 1).
/// With noise by default, the difference is noise; in the opt-in exact mode, complementary
/// suppression hides enough bins that the hidden total is never a small cell.
#[test]
fn the_complement_of_a_suppressed_cell_is_not_a_patient() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    // glu below 60: a handful of patients, a small cell.
    let small: usize = parts
        .iter()
        .flatten()
        .filter(|r| fields(r).0 < 60.0)
        .count();
    assert!((1..11).contains(&small), "{small}");
    let hist = "[[statistics.column]]\nname = \"glu\"\nlow = 40\nhigh = 200\nedges = [40, 60, 100, 140, 200]\n";
    let studies = format!(
        "[[statistics]]\nid = \"h\"\ndataset = \"pima\"\nmin_sites = 3\ntimeout_secs = 20\n{hist}"
    );
    let (ok, log) = run(d, "dp", &SITES, &studies, "");
    assert!(ok, "{log}");
    let r = release(d, "dp", "h").unwrap();
    let bins: Vec<f64> = r["release"]["columns"][0]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| num(&b["value"]))
        .collect();
    let count = num(&r["release"]["count"]["value"]);
    let recovered = count - bins[1..].iter().sum::<f64>();
    println!("count − shown bins = {recovered:.2} (the hidden cell holds {small})");
    // Statistically: the hidden cell holds 3 or 4 patients?
    let q = |id: &str| StatsQuery {
        columns: vec![medfed_protocol::fedstats::StatColumn {
            name: "glu".into(),
            low: 40.0,
            high: 200.0,
            edges: vec![40.0, 60.0, 100.0, 140.0, 200.0],
        }],
        ..query(id, vec![])
    };
    // Is a patient (whose glucose is above 60) in the hidden cell, with glucose 50, or in
    // the bin [100, 140), with 120? The attacker knows everyone else.
    let (site, row, _) = lone_patient(&parts);
    let (a, b) = worlds(&parts, site, row, |p| p[0] = 50.0, |p| p[0] = 120.0);
    let others = a
        .iter()
        .flatten()
        .filter(|r| r[0] < 60.0)
        .count()
        .saturating_sub(1) as f64;
    let trials = 600;
    let guess = |s: &[Vec<f64>]| {
        // The count (entry 0) minus the bins from 60 up (entries 4, 5, 6): the hidden cell.
        let hidden = s[0][0] - (s[0][4] + s[0][5] + s[0][6]);
        hidden < others + 0.5
    };
    assert_fails(
        "complement of a suppressed cell",
        score(&[q("h")], &a, &b, guess, trials),
        trials,
    );

    // Opt-in exact statistics: the small bin is hidden with enough of the others.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    federation(d);
    let exact = "exact_releases = [\"statistics\"]\n";
    let studies = format!(
        "[[statistics]]\nid = \"h\"\ndataset = \"pima\"\nexact = true\nmin_sites = 3\ntimeout_secs = 20\n{hist}"
    );
    let (ok, log) = run(d, "exact", &SITES, &studies, exact);
    assert!(ok, "{log}");
    let r = release(d, "exact", "h").unwrap();
    let count = num(&r["release"]["count"]["value"]);
    assert_eq!(count, 200.0);
    let bins: Vec<Option<f64>> = r["release"]["columns"][0]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["value"].as_f64())
        .collect();
    let hidden = bins.iter().filter(|b| b.is_none()).count();
    let shown: f64 = bins.iter().flatten().sum();
    assert!(hidden >= 2, "{bins:?}");
    assert!(
        count - shown >= 11.0,
        "the hidden bins hold {} patients: {bins:?}",
        count - shown
    );
    assert!(
        r["release"]["columns"][0]["quantiles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q[1]["value"].is_null()),
        "exact quartiles would give the hidden bins back: {r}"
    );
}

/// The same query with three sites, then with two: the difference would be one hospital's
/// statistics. By default both are noisy (and charged); in the exact mode the two sites
/// that answered the first decline the second.
#[test]
fn site_set_differencing_isolates_no_hospital() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    let (ok, log) = run(d, "three", &SITES, &statistics("q", "", 3, ""), "");
    assert!(ok, "{log}");
    let (ok, log) = run(d, "two", &SITES[..2], &statistics("q2", "", 2, ""), "");
    assert!(ok, "{log}");
    let three = release(d, "three", "q").unwrap();
    let two = release(d, "two", "q2").unwrap();
    let c_count = num(&three["release"]["count"]["value"]) - num(&two["release"]["count"]["value"]);
    println!(
        "site-c's count from the difference: {c_count:.2} (exact {})",
        parts[2].len()
    );
    // Statistically: does site-c's one patient have BMI 25 or 40? The attacker has the sum
    // over three sites and over two.
    let (site, row) = (2, 0);
    let (a, b) = worlds(&parts, site, row, |p| p[1] = 25.0, |p| p[1] = 40.0);
    let trials = 600;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let q = query("q", vec![]);
    let mut right = 0;
    for t in 0..trials {
        let (w, is_b) = if t % 2 == 0 { (&a, false) } else { (&b, true) };
        let all: Vec<Vec<Vec<f64>>> = w.iter().map(|rows| cohort_rows_of(&q, rows)).collect();
        let s3 = noisy_sum(&q, &all, &mut rng);
        let s2 = noisy_sum(&q, &all[..2], &mut rng);
        // site-c's BMI sum minus everyone else's there (known to this attacker).
        let others: f64 = w[2][1..].iter().map(|r| r[1]).sum();
        let guess = (s3[6] - s2[6]) * 70.0 - others > 32.5;
        if guess == is_b {
            right += 1;
        }
    }
    let rate = f64::from(right) / trials as f64;
    let share = |n: usize| {
        q.site_share_sigma(GRID_BITS, threshold(n), COLLUDERS)
            .unwrap()
    };
    // The difference's noise per entry: three shares of the first sum, two of the second.
    // The worlds differ by 15/70 in the BMI sum, in the squares and in two bins.
    let var = 3.0 * share(3).powi(2) + 2.0 * share(2).powi(2);
    let diff = ((40.0f64 - 25.0) / 70.0).powi(2) + ((1600.0 - 625.0) / 4900.0f64).powi(2) + 2.0;
    let bound = phi((diff / var).sqrt() / 2.0);
    assert_fails("site-set differencing", (rate, bound), trials);

    // Exact mode: the first exact answer is remembered with its sites; the same cohort
    // with fewer sites is declined.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    federation(d);
    let exact = "exact_releases = [\"statistics\"]\n";
    let (ok, log) = run(
        d,
        "three",
        &SITES,
        &statistics("q", "", 3, "exact = true\n"),
        exact,
    );
    assert!(ok, "{log}");
    let (ok, log) = run(
        d,
        "two",
        &SITES[..2],
        &statistics("q2", "", 2, "exact = true\n"),
        exact,
    );
    assert!(!ok, "the second exact query must not be released:\n{log}");
    assert!(release(d, "two", "q2").is_none());
    assert!(
        log.contains("this site's policy does not serve this query"),
        "{log}"
    );
    let node = std::fs::read_to_string(d.join("site-a-two.log")).unwrap();
    assert!(node.contains("summed with other sites"), "{node}");
}

/// The budget is the only thing between an attacker and averaging the noise away: it
/// holds, each release is charged before it leaves, and once spent nothing more is
/// answered (exact or not).
#[test]
fn a_spent_budget_answers_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    federation(d);
    // The default budget: ε 5 per study (here a query), 10 in all, δ = 1e-6. Releases at
    // the default z = 1.5 compose (by RDP) to k of them within 10; the next one finds it
    // spent.
    let budget = medfed_node::policy::PrivacyPolicy::default().budget();
    let mut ledger = medfed_protocol::dp::ledger::Ledger::default();
    let mut k = 0;
    let z = 1.5;
    while ledger.check(&format!("q{}", k + 1), z, &budget).is_ok() {
        k += 1;
        ledger.record(&format!("q{k}"), z);
    }
    assert!((2..40).contains(&k), "{k}");
    let studies: String = (1..=k + 1)
        .map(|i| statistics(&format!("q{i}"), "", 3, ""))
        .collect();
    let (ok, log) = run(d, "budget", &SITES, &studies, "");
    assert!(!ok, "query {} is refused:\n{log}", k + 1);
    for i in 1..=k {
        assert!(
            release(d, "budget", &format!("q{i}")).is_some(),
            "q{i}:\n{log}"
        );
    }
    assert!(release(d, "budget", &format!("q{}", k + 1)).is_none());
    assert!(log.contains("privacy budget"), "{log}");
    for s in SITES {
        let ledger =
            medfed_node::privacy::load_ledger(&d.join(format!("{s}-state/privacy-ledger.json")))
                .unwrap();
        let spent = ledger.epsilon(None, budget.delta);
        assert!(spent <= budget.total_epsilon, "{s}: {spent}");
        let releases: u64 = ledger
            .studies
            .values()
            .map(|x| x.releases.iter().map(|r| r.1).sum::<u64>())
            .sum();
        assert_eq!(releases, k, "{s}");
    }
    // The noise the real nodes added is the noise the statistical judgements assume: the
    // released counts and bins of the k answers (all rows) against the exact ones.
    let (_, rows) = pima();
    let glu: Vec<f64> = rows.iter().map(|r| fields(&format!("{r},x")).0).collect();
    let bmi: Vec<f64> = rows.iter().map(|r| fields(&format!("{r},x")).1).collect();
    let bins = |xs: &[f64], edges: &[f64]| -> Vec<f64> {
        (0..edges.len() - 1)
            .map(|b| {
                let last = b + 2 == edges.len();
                xs.iter()
                    .filter(|x| {
                        **x >= edges[b] && (**x < edges[b + 1] || (last && **x <= edges[b + 1]))
                    })
                    .count() as f64
            })
            .collect()
    };
    let exact: Vec<f64> = std::iter::once(200.0)
        .chain(bins(&glu, &[40.0, 100.0, 140.0, 200.0]))
        .chain(bins(&bmi, &[15.0, 25.0, 30.0, 35.0, 40.0, 70.0]))
        .collect();
    let (mut sq, mut n, mut stated) = (0.0, 0, 0.0);
    for i in 1..=k {
        let r = release(d, "budget", &format!("q{i}")).unwrap();
        stated = num(&r["release"]["noise_sd_units"]);
        let released: Vec<serde_json::Value> = std::iter::once(r["release"]["count"].clone())
            .chain(
                r["release"]["columns"][0]["histogram"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            )
            .chain(
                r["release"]["columns"][1]["histogram"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            )
            .collect();
        for (x, e) in released.iter().zip(&exact) {
            if let Some(v) = x["value"].as_f64() {
                sq += (v - e).powi(2);
                n += 1;
            }
        }
    }
    let measured = (sq / f64::from(n)).sqrt();
    println!("noise of the real releases: sd {measured:.2} over {n} counts; stated {stated:.2}");
    assert!(n >= 20, "{n}");
    assert!(
        (0.6..1.5).contains(&(measured / stated)),
        "measured {measured}, stated {stated}"
    );
    // An exact query is refused too (no dataset here opts in), budget or not.
    let (ok, log) = run(
        d,
        "exact",
        &SITES,
        &statistics("e", "", 3, "exact = true\n"),
        "",
    );
    assert!(!ok, "{log}");
    assert!(log.contains("only with differential privacy"), "{log}");
    // What the whole budget buys an attacker, at most: the Gaussian mechanism composed k
    // times, μ = √k/z for a patient's presence; far from certainty.
    let mu = (k as f64).sqrt() / z;
    println!(
        "{k} releases in the default budget: a patient's presence is told apart at most {:.1}% of the time",
        100.0 * phi(mu / 2.0)
    );
    assert!(phi(mu / 2.0) < 0.85, "{}", phi(mu / 2.0));
}

/// A cohort that names a patient by SSN: refused by every site, in the same words whether
/// the patient is there or not, even though the rules list the column.
#[test]
fn an_identifier_in_a_cohort_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    let present = fields(&parts[0][3]).3;
    let studies = format!(
        "{}{}",
        statistics(
            "here",
            &format!("{{ column = \"ssn\", op = \"==\", text = \"{present}\" }}"),
            3,
            ""
        ),
        statistics(
            "absent",
            "{ column = \"ssn\", op = \"==\", text = \"999-99-9999\" }",
            3,
            ""
        ),
    );
    let (ok, log) = run(d, "ssn", &SITES, &studies, "");
    assert!(!ok, "{log}");
    assert!(release(d, "ssn", "here").is_none());
    for s in SITES {
        let node = std::fs::read_to_string(d.join(format!("{s}-ssn.log"))).unwrap();
        assert!(
            node.contains("column 'ssn' of dataset 'pima' is an identifier"),
            "{s}:\n{node}"
        );
    }
    // The refusal names the column's class, never whether the value matched anyone.
    let reasons: Vec<&str> = log.lines().filter(|l| l.contains("column 'ssn'")).collect();
    assert!(!reasons.is_empty(), "{log}");
    assert!(reasons.iter().all(|l| !l.contains(&present)), "{reasons:?}");
    // The second query (an SSN nobody has) never ran: the first failure stopped the run. Run
    // it alone: the same refusal.
    let (ok, log2) = run(
        d,
        "ssn2",
        &SITES,
        &statistics(
            "absent",
            "{ column = \"ssn\", op = \"==\", text = \"999-99-9999\" }",
            3,
            "",
        ),
        "",
    );
    assert!(!ok);
    // Every refusal sentence about the column, in either run: the same.
    let words = |log: &str| {
        log.match_indices("column 'ssn'")
            .map(|(i, _)| {
                let rest = &log[i..];
                let end = rest
                    .find("never used by a study or a query")
                    .map_or(rest.len().min(200), |e| {
                        e + "never used by a study or a query".len()
                    });
                rest[..end].to_string()
            })
            .collect::<std::collections::BTreeSet<String>>()
    };
    assert_eq!(words(&log), words(&log2), "{log}\n---\n{log2}");
}

// ---------------------------------------------------------------------------------------
// Red team (issue 13 review): attacks the suite above does not make.
// ---------------------------------------------------------------------------------------

/// A differentially private training study (the default DP-FedAvg, secure aggregation on),
/// written with nothing but ordinary `[[study]]` keys: one feature (`glu`) standardized
/// with `feature_ranges = [[-1, 1]]` (so unchanged), a logistic model, one full-batch
/// epoch, and a learning rate `L`. The first step sets the weight to
/// `−L · mean((1/2 − y)·glu)` over the site's training rows: it overflows, and the node
/// answers "training diverged", exactly when that mean exceeds `MAX/L`. The
/// budget charged before training is that of `noise_multiplier = 1e6` (ε ≈ 10⁻⁵), so the
/// aggregator can bisect every site's exact mean (and, over the splits of other study ids,
/// each row's value) many thousand times within the default budget. Whether a site's
/// training succeeds must not depend on its data.
#[test]
fn a_training_failure_is_not_a_noise_free_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    // (glu, label) of site-a's rows.
    let rows: Vec<(f64, f64)> = parts[0]
        .iter()
        .map(|r| {
            let f = fields(r);
            (f.0, if f.2 == "Yes" { 1.0 } else { 0.0 })
        })
        .collect();
    // From w = 0 the first full-batch step moves the weight of glu by
    // −L·mean((σ(0) − y)·glu) over site-a's training rows (the split is public: it is
    // seeded by the study id); it overflows when L·|that mean| > MAX, i.e. when the
    // probe's threshold is below twice the mean.
    let mean = |id: &str| {
        let (train, _) = medfed_node::data::split_rows(rows.len(), 0.25, id);
        let m = train
            .iter()
            .map(|&i| (0.5 - rows[i].1) * rows[i].0)
            .sum::<f64>()
            / train.len() as f64;
        2.0 * m.abs()
    };
    let probe = |id: &str, threshold: f64| {
        format!(
            "[[study]]\nid = \"{id}\"\ndataset = \"pima\"\nmodel = \"logistic\"\nfeatures = [\"glu\"]\n\
             target = \"type\"\npositive_class = \"Yes\"\nrounds = 1\nmin_sites = 2\n\
             wait_for_sites_secs = 60\nround_timeout_secs = 30\nround_attempts = 1\n\
             [study.training]\nlocal_epochs = 1\nbatch_size = 100000\nlearning_rate = {:e}\nl2 = 0.0\n\
             [study.privacy]\nclip_norm = 1.0\nnoise_multiplier = 1e6\nfeature_ranges = [[-1, 1]]\n",
            f64::MAX / threshold * 2.0
        )
    };
    let mut diverged = Vec::new();
    for (id, factor) in [("below", 1.0 - 1e-9), ("above", 1.0 + 1e-9)] {
        let m = mean(id);
        let (_, log) = run(d, id, &SITES, &probe(id, m * factor), "");
        assert!(log.contains("secure aggregation starts"), "{log}");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("site-a") && l.contains("diverged"))
            .collect();
        println!("{id}: threshold {factor:.9} × site-a's exact mean glucose {m:.6}: {lines:?}");
        diverged.push(!lines.is_empty());
        // The probe is calibrated: site-a's training does fail below its mean, and not
        // above; only the aggregator cannot tell.
        let node = std::fs::read_to_string(d.join(format!("site-a-{id}.log"))).unwrap();
        assert_eq!(
            node.contains("local training failed"),
            id == "below",
            "{id}:\n{node}"
        );
    }
    let cost = medfed_protocol::fedstats::ReleasePrivacy::of(1e6, 1e-6).epsilon;
    println!("each probe costs a site ε = {cost:.2e} of its budget");
    assert_eq!(
        diverged[0], diverged[1],
        "whether site-a's training fails tells its mean glucose apart to 1e-9: {diverged:?}"
    );
}

/// Whether a site takes part in a differentially private study must not depend on one
/// patient's value. Today a site whose dataset holds one non-numeric cell (`NA`) in a
/// study's feature declines the study ("this site's policy does not serve this query", the
/// same words as any data-dependent refusal), and accepts it otherwise: the decision itself
/// says, without noise and before any budget is charged, whether some patient's `skin` is
/// missing. An aggregator that knows every other patient learns the target's.
#[test]
fn whether_a_site_takes_part_does_not_depend_on_a_patients_value() {
    let study = "[[study]]\nid = \"s\"\ndataset = \"pima\"\nmodel = \"logistic\"\nfeatures = [\"skin\"]\n\
        target = \"type\"\npositive_class = \"Yes\"\nrounds = 1\nmin_sites = 2\n\
        wait_for_sites_secs = 60\nround_timeout_secs = 30\nround_attempts = 1\n\
        [study.privacy]\nclip_norm = 1.0\nnoise_multiplier = 1e6\nfeature_ranges = [[0, 100]]\n";
    let mut accepted = Vec::new();
    for missing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        federation(d);
        if missing {
            // The target patient (site-a's first row) has no skin-fold measurement.
            let path = d.join("site-a.csv");
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines[1] = medfed::csv_text::with_field(&lines[1], 3, "NA");
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        }
        let (_, log) = run(d, "s", &SITES, study, "");
        let a = log
            .lines()
            .any(|l| l.contains("site accepted the study") && l.contains("site-a"));
        println!("skin missing for one patient: {missing}; site-a takes part: {a}");
        accepted.push(a);
    }
    assert_eq!(
        accepted[0], accepted[1],
        "site-a's decision tells whether one patient's value is missing"
    );
}

/// The three-query tracker in the opt-in exact mode (found by the red team): `glu <= v`,
/// `glu >= v` and all rows each differ from the others by far more than `min_cell`
/// patients at every site, so the memory of answered cohorts lets all three through, and
/// `q1 + q2 − q3` is the exact record of the one patient with glucose `v`. No automatic
/// check can tell trackers from ordinary queries (Dinur–Nissim; Denning), so exact
/// answers are given only to queries the site's operator approved one by one, by hash:
/// rules alone (as here) get none of them.
#[test]
fn the_exact_mode_tracker_recovers_a_patients_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts = federation(d);
    // A patient whose glucose nobody else has, near the middle, so that both halves hold
    // at least min_cell patients at every site.
    let all: Vec<f64> = parts.iter().flatten().map(|r| fields(r).0).collect();
    let (site, row) = parts
        .iter()
        .enumerate()
        .flat_map(|(s, p)| (0..p.len()).map(move |i| (s, i)))
        .filter(|&(s, i)| {
            let g = fields(&parts[s][i]).0;
            all.iter().filter(|x| **x == g).count() == 1
        })
        .min_by(|a, b| {
            let g = |&(s, i): &(usize, usize)| (fields(&parts[s][i]).0 - 120.0).abs();
            g(a).total_cmp(&g(b))
        })
        .unwrap();
    let (v, bmi, _, _) = fields(&parts[site][row]);
    let exact = "exact = true\n";
    let studies = format!(
        "{}{}{}",
        statistics(
            "le",
            &format!("{{ column = \"glu\", op = \"<=\", value = {v} }}"),
            3,
            exact
        ),
        statistics(
            "ge",
            &format!("{{ column = \"glu\", op = \">=\", value = {v} }}"),
            3,
            exact
        ),
        statistics("all", "", 3, exact),
    );
    let (_, log) = run_with_rules(
        d,
        "exact-tracker",
        &SITES,
        &studies,
        "exact_releases = [\"statistics\"]\n",
        "",
        false,
    );
    let r: Vec<Option<serde_json::Value>> = ["le", "ge", "all"]
        .iter()
        .map(|id| release(d, "exact-tracker", id))
        .collect();
    assert!(
        r.iter().all(Option::is_none),
        "an exact query approved by rules only was released"
    );
    assert!(
        log.contains("approved one by one"),
        "the sites say why they refuse:\n{log}"
    );
    if r.iter().any(Option::is_none) {
        return;
    }
    let r: Vec<serde_json::Value> = r.into_iter().flatten().collect();
    let track = |f: &dyn Fn(&serde_json::Value) -> f64| f(&r[0]) + f(&r[1]) - f(&r[2]);
    let count = track(&|x| num(&x["release"]["count"]["value"]));
    let bmi_sum = track(&|x| num(&x["release"]["columns"][1]["sum"]["value"]));
    println!("exact tracker: count {count} (1), BMI {bmi_sum} (the patient's: {bmi})");
    assert!(
        !((count - 1.0).abs() < 0.01 && (bmi_sum - bmi).abs() < 0.01),
        "three exact answers give the patient with glucose {v} back: BMI {bmi_sum}"
    );
}

/// With `min_training_rows` in the rules (a documented policy key), whether a site accepts
/// a differentially private study says whether its training rows reach the minimum, and
/// the aggregator picks `validation_fraction`: one patient more or less at site-a flips the
/// decision (67 rows: 50 to train at 0.25; 66 rows: 49), without noise and before any
/// budget is charged. Bisecting the fraction gives a site's exact row count.
#[test]
fn min_training_rows_does_not_tell_a_patients_presence() {
    let study = "[[study]]\nid = \"s\"\ndataset = \"pima\"\nmodel = \"logistic\"\nfeatures = [\"glu\"]\n\
        target = \"type\"\npositive_class = \"Yes\"\nvalidation_fraction = 0.25\nrounds = 1\n\
        min_sites = 2\nwait_for_sites_secs = 60\nround_timeout_secs = 30\nround_attempts = 1\n\
        [study.privacy]\nclip_norm = 1.0\nnoise_multiplier = 1e6\nfeature_ranges = [[0, 200]]\n";
    let mut accepted = Vec::new();
    for present in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let parts = federation(d);
        assert_eq!(parts[0].len(), 67);
        if !present {
            // The target patient (site-a's first row) is not at site-a.
            let path = d.join("site-a.csv");
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let kept: Vec<&str> = std::iter::once(lines[0])
                .chain(lines[2..].iter().copied())
                .collect();
            std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        }
        let (_, log) = run_with_rules(d, "s", &SITES, study, "", "min_training_rows = 50\n", false);
        let a = log
            .lines()
            .any(|l| l.contains("site accepted the study") && l.contains("site-a"));
        println!("target patient at site-a: {present}; site-a takes part: {a}");
        accepted.push(a);
    }
    assert_eq!(
        accepted[0], accepted[1],
        "site-a's decision tells whether the patient is there"
    );
}
