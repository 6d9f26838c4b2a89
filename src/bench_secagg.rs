//! `medfed bench secagg`: the cost of one secure aggregation, with every party simulated in
//! this process and messages crossing as bytes. Client and aggregator work are timed
//! separately; the aggregator's memory is metered by the allocator in a build with
//! `--features alloc-meter` (and not measured otherwise).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::sim::{Actor, DropBefore, Identities, Stopwatch, run};
use medfed_protocol::secagg::{PartyId, Setup, choose_neighbours, crypto};

/// The counting allocator, or stand-ins that measure nothing in a build without it.
#[cfg(feature = "alloc-meter")]
use medfed_alloc_meter as alloc_meter;
#[cfg(not(feature = "alloc-meter"))]
mod alloc_meter {
    pub fn metered<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    pub fn release(_: usize) {}
    pub fn reset() {}
    pub fn peak() -> usize {
        0
    }
}

#[derive(clap::Args)]
pub struct SecAggArgs {
    /// Numbers of parties, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
    parties: Vec<usize>,
    /// Vector lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    dims: Vec<usize>,
    /// Dropout rates in percent (parties lost after sharing keys, before sending input).
    #[arg(long, value_delimiter = ',', default_value = "0,10")]
    dropouts: Vec<u32>,
    /// Neighbours per party; default: chosen for 10% dropouts and 5% corrupt parties
    /// (failure below 2^-20, exposure below 2^-30).
    #[arg(long)]
    neighbours: Option<u32>,
    /// Skip the round comparable with Flower's published SecAgg+ figure.
    #[arg(long)]
    no_flower: bool,
    /// Threads the simulated parties run on (the aggregator has one).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Default)]
struct Clock {
    clients: Duration,
    server: Duration,
}

impl Stopwatch for Clock {
    fn fork(&self) -> Self {
        Clock::default()
    }
    fn join(&mut self, other: Self) {
        self.clients += other.clients;
        self.server += other.server;
    }
    fn sent(&mut self, actor: Actor, bytes: usize) {
        // A message the aggregator serialized has left it: its buffer is freed later by the
        // receiving party, outside the meter.
        if let Actor::Server = actor {
            alloc_meter::release(bytes);
        }
    }
    fn time<R>(&mut self, actor: Actor, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = match actor {
            Actor::Server => alloc_meter::metered(f),
            Actor::Client(_) => f(),
        };
        match actor {
            Actor::Server => self.server += start.elapsed(),
            Actor::Client(_) => self.clients += start.elapsed(),
        }
        r
    }
}

struct Row {
    n: usize,
    d: usize,
    drop_pct: u32,
    k: u32,
    t: u32,
    bits: u8,
    client_ms: f64,
    keystream_ms: f64,
    server_ms: f64,
    round_ms: f64,
    sent_mb: f64,
    expansion: f64,
    server_mb: f64,
    memory_target_mb: f64,
}

fn measure(
    n: usize,
    d: usize,
    drop_pct: u32,
    neighbours: Option<u32>,
    threads: usize,
) -> anyhow::Result<Row> {
    let (k, t) = match neighbours {
        Some(k) => {
            let k = k.min(n as u32 - 1);
            (k, k.div_ceil(2) + 1)
        }
        None => choose_neighbours(n, 0.1, 0.05, 20, 30),
    };
    let label = format!("bench/{n}/{d}/{drop_pct}");
    let setup = Setup {
        graph_seed: Setup::graph_seed_for(&label),
        label,
        parties: (0..n).map(|i| format!("site-{i:04}")).collect(),
        threshold: t,
        neighbours: k,
        dimension: d as u32,
        quant: QuantParams::for_parties(n, 1.0, 16)?,
        binding: [0; 32],
    };
    let ids = Identities::new(&setup.parties);
    let dropped = n * drop_pct as usize / 100;
    let drops: BTreeMap<PartyId, DropBefore> = (0..dropped)
        .map(|i| ((i * n / dropped.max(1)) as PartyId, DropBefore::MaskedInput))
        .collect();
    // Cheap synthetic inputs in [-0.5, 0.5): generating them costs next to nothing.
    let inputs = |u: PartyId| {
        (0..d)
            .map(|j| ((u as usize * 7 + j) % 1000) as f64 * 0.001 - 0.5)
            .collect()
    };
    let mut clock = Clock::default();
    alloc_meter::reset();
    let start = Instant::now();
    let out = run(
        &setup, &inputs, &drops, &ids, &mut clock, threads, false, None,
    );
    // Wall time of the round with every party on this machine (clients on `threads` threads).
    let round = start.elapsed();
    out.result
        .map_err(|e| anyhow::anyhow!("n = {n}, d = {d}: {e}"))?;
    // The reference: generating one party's k masks of d words on this machine.
    let mut buf = vec![0u64; d];
    let ks_start = Instant::now();
    for i in 0..k {
        crypto::apply_mask(&mut buf, &[i as u8; 32], setup.quant.modulus_bits, 1);
    }
    let keystream = ks_start.elapsed();
    std::hint::black_box(&buf);
    let active = n - dropped;
    let sent: usize = out.bytes_sent.values().sum();
    let plain = d * setup.quant.word_bytes();
    Ok(Row {
        n,
        d,
        drop_pct,
        k,
        t,
        bits: setup.quant.modulus_bits,
        client_ms: clock.clients.as_secs_f64() * 1e3 / n as f64,
        keystream_ms: keystream.as_secs_f64() * 1e3,
        server_ms: clock.server.as_secs_f64() * 1e3,
        round_ms: round.as_secs_f64() * 1e3,
        sent_mb: sent as f64 / active.max(1) as f64 / 1e6,
        expansion: sent as f64 / active.max(1) as f64 / plain as f64,
        server_mb: if cfg!(feature = "alloc-meter") {
            alloc_meter::peak() as f64 / 1e6
        } else {
            f64::NAN
        },
        memory_target_mb: (4 * 8 * d) as f64 / 1e6 + n as f64 / 100.0,
    })
}

pub fn secagg(args: SecAggArgs) -> anyhow::Result<()> {
    println!(
        "secure aggregation, every party simulated in this process (clients on {} threads; the aggregator on one, all cores when unmasking), one run per row",
        args.threads
    );
    if !cfg!(feature = "alloc-meter") {
        println!(
            "aggr. MB is not measured (NaN) in this build: the allocator that meters it is the \
             cargo feature alloc-meter (cargo run --release --features alloc-meter -- bench secagg)"
        );
    }
    println!(
        "\n{:>4} {:>8} {:>5} {:>4} {:>4} {:>4}  {:>10} {:>10} {:>6}  {:>10} {:>10}  {:>9} {:>6}  {:>10} {:>10}",
        "n",
        "d",
        "drop",
        "k",
        "t",
        "bits",
        "client ms",
        "masks ms",
        "ratio",
        "aggr. ms",
        "round ms",
        "sent MB",
        "x",
        "aggr. MB",
        "target MB"
    );
    println!("{}", "-".repeat(132));
    for &d in &args.dims {
        for &n in &args.parties {
            for &drop_pct in &args.dropouts {
                let r = measure(n, d, drop_pct, args.neighbours, args.threads)?;
                println!(
                    "{:>4} {:>8} {:>4}% {:>4} {:>4} {:>4}  {:>10.2} {:>10.2} {:>6.2}  {:>10.1} {:>10.1}  {:>9.3} {:>6.2}  {:>10.1} {:>10.1}",
                    r.n,
                    r.d,
                    r.drop_pct,
                    r.k,
                    r.t,
                    r.bits,
                    r.client_ms,
                    r.keystream_ms,
                    r.client_ms / r.keystream_ms,
                    r.server_ms,
                    r.round_ms,
                    r.sent_mb,
                    r.expansion,
                    r.server_mb,
                    r.memory_target_mb
                );
            }
        }
    }
    println!(
        "\nclient ms: one party's work for the whole round (mean); masks ms: generating k masks of d words here;\n\
         ratio: client / masks (target <= 3); aggr.: the aggregator's work and peak memory (target: 4*8*d bytes + 1 MB per 100 parties);\n\
         round ms: wall time of the whole round with every party on this machine; x: bytes sent / the plain d-word vector."
    );
    if !args.no_flower {
        // Flower 1.41's SecAgg+ with n = 100, d = 10^5 and 11 shares (each client and its 10
        // neighbours), measured on this kind of machine: 5.9 s per round in the project's
        // reference notes, 8.8 s in the issue that set the target (docs/performance.md).
        // The same n, d and neighbours here, median of three rounds:
        let mut rounds: Vec<f64> = (0..3)
            .map(|_| measure(100, 100_000, 0, Some(10), args.threads).map(|r| r.round_ms))
            .collect::<anyhow::Result<_>>()?;
        rounds.sort_by(f64::total_cmp);
        let ms = rounds[1];
        println!(
            "\nas Flower's SecAgg+ benchmark (n = 100, d = 10^5, 10 neighbours, no dropout): {ms:.0} ms per round (median of 3);\n\
             Flower 1.41 takes 5,900 to 8,800 ms on this kind of machine (two recorded measurements): {:.1}x to {:.1}x faster (target 20x)",
            5900.0 / ms,
            8800.0 / ms
        );
    }
    Ok(())
}
