//! The scheduler against random selection, in virtual time: 100 simulated sites with very
//! different speeds and reliability, 300 rounds each way, the same quorum and coverage.

use medfed_protocol::schedule::{Requirements, SiteStats, plan};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Site {
    median_ms: f64,
    spread: f64,
    dropout: f64,
}

/// One response: its time, or None if the site never answers this round.
fn respond(s: &Site, rng: &mut ChaCha8Rng) -> Option<f64> {
    if rng.random::<f64>() < s.dropout {
        return None;
    }
    // Log-normal around the site's median.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    Some(s.median_ms * (s.spread * z).exp())
}

/// Round time and answers for `chosen` with deadline `d`: the round ends when every chosen
/// site has answered or at the deadline.
fn run_round(
    sites: &[Site],
    chosen: &[usize],
    d: f64,
    rng: &mut ChaCha8Rng,
) -> (f64, Vec<(usize, Option<f64>)>) {
    let answers: Vec<(usize, Option<f64>)> = chosen
        .iter()
        .map(|&i| (i, respond(&sites[i], rng)))
        .collect();
    let all_in_time = answers.iter().all(|(_, t)| t.is_some_and(|t| t <= d));
    let time = if all_in_time {
        answers.iter().filter_map(|(_, t)| *t).fold(0.0, f64::max)
    } else {
        d
    };
    (time, answers)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn latency_aware_rounds_are_faster_than_random_ones_at_equal_coverage() {
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    // Medians from 50 ms to 20 s; dropout rates from 0 to 30%.
    let sites: Vec<Site> = (0..100)
        .map(|_| Site {
            median_ms: 50.0 * (400f64).powf(rng.random::<f64>()),
            spread: 0.1 + 0.4 * rng.random::<f64>(),
            dropout: 0.3 * rng.random::<f64>().powi(2),
        })
        .collect();
    let req = Requirements {
        quorum: 30,
        min_coverage: 0.3,
        confidence_z: 1.645,
        max_deadline_ms: 60_000.0,
    };
    let mut stats: Vec<SiteStats> = (0..100)
        .map(|i| SiteStats::new(format!("s{i}"), 1000, 1000.0))
        .collect();

    // Warm-up: everyone is invited for a few rounds so that the history means something.
    for _ in 0..5 {
        let all: Vec<usize> = (0..100).collect();
        let (_, answers) = run_round(&sites, &all, req.max_deadline_ms, &mut rng);
        for (i, t) in answers {
            stats[i].observe(t);
        }
    }

    let rounds = 300;
    let (mut aware_times, mut aware_cov, mut aware_ok) = (Vec::new(), 0.0, 0);
    let mut sizes = Vec::new();
    for _ in 0..rounds {
        let p = plan(&stats, &req).unwrap_or(medfed_protocol::schedule::Plan {
            participants: (0..100).collect(),
            deadline_ms: req.max_deadline_ms,
        });
        let (time, answers) = run_round(&sites, &p.participants, p.deadline_ms, &mut rng);
        let answered = answers
            .iter()
            .filter(|(_, t)| t.is_some_and(|t| t <= p.deadline_ms))
            .count();
        for (i, t) in answers {
            stats[i].observe(t);
        }
        aware_times.push(time);
        aware_cov += answered as f64 / 100.0;
        aware_ok += usize::from(answered >= req.quorum);
        sizes.push(p.participants.len());
    }

    // Random selection of the same number of sites, waiting for them up to the cap.
    let (mut random_times, mut random_cov, mut random_ok) = (Vec::new(), 0.0, 0);
    for &k in &sizes {
        let mut all: Vec<usize> = (0..100).collect();
        for i in 0..k {
            let j = rng.random_range(i..100);
            all.swap(i, j);
        }
        let (time, answers) = run_round(&sites, &all[..k], req.max_deadline_ms, &mut rng);
        let answered = answers.iter().filter(|(_, t)| t.is_some()).count();
        random_times.push(time);
        random_cov += answered as f64 / 100.0;
        random_ok += usize::from(answered >= req.quorum);
    }

    let (aware, random) = (median(aware_times), median(random_times));
    println!(
        "median round time: latency-aware {aware:.0} ms, random {random:.0} ms; mean coverage {:.2} vs {:.2}; quorum met in {aware_ok} vs {random_ok} of {rounds} rounds",
        aware_cov / f64::from(rounds),
        random_cov / f64::from(rounds)
    );
    assert!(
        aware < random / 2.0,
        "latency-aware {aware} ms is not clearly faster than random {random} ms"
    );
    assert!(
        aware_cov / f64::from(rounds) >= random_cov / f64::from(rounds) - 0.05,
        "coverage fell"
    );
    // The plan aims at 95% confidence under a normal model of log-normal latencies; allow
    // for the approximation (a failed round is retried).
    assert!(
        aware_ok as f64 >= 0.9 * f64::from(rounds),
        "the quorum failed in {} rounds",
        rounds as usize - aware_ok
    );
}
