//! `medfed bench audit`: what the compliance log costs per message: appending a record
//! (with a signed, fsynced tree head every 256 records), the bytes it adds, and hashing the
//! message's frame.

use std::time::Instant;

use medfed_infra::auditlog::{AuditLog, BATCH};
use medfed_protocol::audit::{Event, MessageEntry, sha256_hex};

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Records to append.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
}

pub fn audit(args: AuditArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.records > 0, "--records must be at least 1");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.log");
    let log = AuditLog::open(
        &path,
        &dir.path().join("bench.key"),
        "bench-site",
        "node",
        "bench",
        "cfg",
    )?;
    let before = std::fs::metadata(&path)?.len();
    let start = Instant::now();
    for i in 0..args.records {
        log.record(Event::Sent(MessageEntry {
            peer: "aggregator".into(),
            message: "masked-input".into(),
            study: Some("pima-diabetes".into()),
            round: Some((i % 1000) as u32),
            bytes: 401_234,
            sha256: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328".into(),
        }))?;
    }
    log.close("bench")?;
    let per_record = start.elapsed().as_secs_f64() / args.records as f64;
    let bytes = (std::fs::metadata(&path)?.len() - before) as f64 / args.records as f64;
    // Hashing the frame is the other cost of logging a message: measure it for the sizes a
    // round sends.
    let mut rows = Vec::new();
    for size in [1_000usize, 400_000, 8_000_000] {
        let frame = vec![7u8; size];
        let reps = (50_000_000 / size).clamp(3, 10_000);
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(sha256_hex(&frame));
        }
        rows.push((size, t.elapsed().as_secs_f64() / reps as f64));
    }
    println!(
        "compliance log: {} records appended, a signed and fsynced tree head every {BATCH}",
        args.records
    );
    println!(
        "  per record: {:.1} µs, {bytes:.0} bytes on disk (including tree heads)",
        per_record * 1e6
    );
    println!("\n{:>12}  {:>14}", "frame bytes", "SHA-256 time");
    for (size, secs) in rows {
        println!("{size:>12}  {:>11.3} ms", secs * 1e3);
    }
    println!("\nper message logged: one record plus hashing its frame");
    Ok(())
}
