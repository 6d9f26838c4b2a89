//! `medfed bench ingest`: CSV → parse → task → state, with a checkpoint every 10,000
//! records, on a synthetic stream drawn from the Pima data's per-column statistics.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use medfed_infra::store::{self, Backend};
use medfed_node::runtime::{ColumnStats, RunOptions, csv_source, restore, run_partition};
use rand::{RngExt, SeedableRng};

#[derive(clap::Args)]
pub struct IngestArgs {
    /// Records in the synthetic stream.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Store backend: redb, or sled in a build with `--features sled` (default: every backend
    /// of this build, one after the other).
    #[arg(long)]
    backend: Option<Backend>,
}

/// Per-column (mean, sd) of Pima.tr: npreg, glu, bp, skin, bmi, ped, age.
const PIMA: [(&str, f64, f64); 7] = [
    ("npreg", 3.57, 3.37),
    ("glu", 124.0, 31.7),
    ("bp", 71.3, 11.6),
    ("skin", 29.2, 11.7),
    ("bmi", 32.3, 6.1),
    ("ped", 0.46, 0.31),
    ("age", 32.1, 10.9),
];

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.records > 0, "--records must be at least 1");
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("stream.csv");
    let t = Instant::now();
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&csv)?);
        writeln!(
            f,
            "{},type",
            PIMA.iter().map(|c| c.0).collect::<Vec<_>>().join(",")
        )?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..args.records {
            for (_, mean, sd) in PIMA {
                // A rough normal draw (sum of uniforms) is enough for throughput work.
                let z: f64 = (0..4).map(|_| rng.random::<f64>()).sum::<f64>() - 2.0;
                write!(f, "{:.2},", (mean + sd * z * 1.7).max(0.0))?;
            }
            writeln!(f, "{}", if rng.random::<bool>() { "Yes" } else { "No" })?;
        }
    }
    println!(
        "synthetic stream: {} records ({:.0} MB) written in {:.1} s",
        args.records,
        std::fs::metadata(&csv)?.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let columns: Vec<&str> = PIMA.iter().map(|c| c.0).collect();
    println!(
        "\n{:<6}  {:>12}  {:>10}  {:>12}",
        "store", "records/s", "seconds", "checkpoints"
    );
    println!("{}", "-".repeat(46));
    let backends = match args.backend {
        Some(b) => vec![b],
        None => Backend::built(),
    };
    for backend in backends {
        let s: Arc<dyn store::Store> = Arc::from(store::open(
            backend,
            &dir.path().join(format!("state-{}", backend.name())),
        )?);
        let t = Instant::now();
        let (offset, ..) = restore(&*s, "stream", 0)?;
        let (header, rx) = csv_source::read(&csv, "stream", 0, offset)?;
        let task = ColumnStats::new(&header, &columns)?;
        let report = run_partition(
            Box::new(task),
            s,
            "stream",
            0,
            rx,
            &RunOptions {
                commit_every: 10_000,
                window: None,
                signals: None,
                checkpoint_when_idle: false,
                caught_up: None,
            },
        )?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{:<6}  {:>12.0}  {:>10.2}  {:>12}",
            backend.name(),
            report.processed as f64 / secs,
            secs,
            report.checkpoints
        );
    }
    println!(
        "\npeak memory of this process: {:.0} MB (the stream is read, not loaded)",
        peak_rss_mb()
    );
    Ok(())
}
