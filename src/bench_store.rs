//! `medfed bench store`: the store backends side by side (sled only in a build with
//! `--features sled`): checkpoint latency (one
//! atomic, fsynced commit of offsets and state) and the throughput of committing large
//! batches.

use std::time::Instant;

use medfed_infra::store::{self, Backend, Batch};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// Small checkpoints to time (offsets + two state keys each).
    #[arg(long, default_value_t = 200)]
    checkpoints: u32,
    /// Keys per large batch.
    #[arg(long, default_value_t = 10_000)]
    batch_keys: u32,
}

pub fn store(args: StoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.checkpoints > 0 && args.batch_keys > 0,
        "--checkpoints and --batch-keys must be positive"
    );
    println!(
        "{:<6}  {:>22}  {:>26}  {:>14}",
        "store", "checkpoint (median ms)", "batch of keys (keys/s)", "size on disk"
    );
    println!("{}", "-".repeat(76));
    for backend in Backend::built() {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state");
        let s = store::open(backend, &path)?;
        let mut times = Vec::new();
        for i in 0..u64::from(args.checkpoints) {
            let mut b = Batch::default();
            b.put("offsets", b"input-0", &(i * 10_000).to_be_bytes())?;
            b.put("task/stats", b"sum", &i.to_be_bytes())?;
            b.put("task/stats", b"count", &(i * 3).to_be_bytes())?;
            let t = Instant::now();
            s.commit(b)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let mut b = Batch::default();
        for k in 0..args.batch_keys {
            b.put("task/patients", &k.to_be_bytes(), &[7u8; 64])?;
        }
        let t = Instant::now();
        s.commit(b)?;
        let rate = f64::from(args.batch_keys) / t.elapsed().as_secs_f64();
        drop(s);
        let size = dir_size(&path);
        println!(
            "{:<6}  {:>22.2}  {:>26.0}  {:>11.1} MB",
            backend.name(),
            times[times.len() / 2],
            rate,
            size as f64 / 1e6
        );
    }
    println!(
        "\nthe crash test (tests/integration/store_crash.rs) kills a writer 50 times per backend; the default is {}",
        Backend::DEFAULT.name()
    );
    Ok(())
}

fn dir_size(path: &std::path::Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    std::fs::read_dir(path).map_or(0, |rd| {
        rd.filter_map(Result::ok).map(|e| dir_size(&e.path())).sum()
    })
}
