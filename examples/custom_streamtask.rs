//! A custom StreamTask: counts patients with glucose above a threshold in a CSV extract,
//! with its count checkpointed with the input offset, so that running it twice (or after a
//! crash) never counts a row twice.
//!
//! ```sh
//! cargo run --release --example custom_streamtask
//! ```

use std::sync::Arc;

use medfed_infra::store::{self, Backend};
use medfed_node::runtime::{
    Envelope, KvState, MessageCollector, Rejection, RunOptions, StreamTask, TaskCoordinator,
    TaskError, csv_row::Splitter, csv_source, restore, run_partition,
};

/// Counts rows whose `glu` is above `threshold`; quarantines rows without a number there.
struct HighGlucose {
    column: usize,
    /// The header's number of columns.
    width: usize,
    splitter: Splitter,
    threshold: f64,
}

impl StreamTask for HighGlucose {
    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        _: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        // The ingestion's CSV dialect: quoted fields, and a row wider than the header refused.
        let cells = match self.splitter.row(&env.payload, self.width) {
            Ok(cells) => cells,
            Err(why) => {
                out.dead_letter(env, why);
                return Ok(());
            }
        };
        match cells.get(self.column).unwrap_or("").trim().parse::<f64>() {
            Ok(glu) if glu > self.threshold => state.put_u64(b"high", state.get_u64(b"high") + 1),
            Ok(_) => {}
            // The field and why, never the value: dead letters stay in the node's store.
            Err(_) => out.dead_letter(env, Rejection::in_field("glu", "not a number")),
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr2_missing.csv");
    let dir = tempfile::tempdir()?;
    let s: Arc<dyn store::Store> =
        Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state"))?);
    for run in 1..=2 {
        let (offset, ..) = restore(&*s, "pima", 0)?;
        let (header, rows) = csv_source::read(&data, "pima", 0, offset)?;
        let column = header
            .iter()
            .position(|h| h == "glu")
            .ok_or("no glu column")?;
        let task = HighGlucose {
            column,
            width: header.len(),
            splitter: Splitter::new(),
            threshold: 140.0,
        };
        let report = run_partition(
            Box::new(task),
            s.clone(),
            "pima",
            0,
            rows,
            &RunOptions::default(),
        )?;
        let (_, state, ..) = restore(&*s, "pima", 0)?;
        println!(
            "run {run}: resumed at row {offset}, rows processed so far {}, quarantined {}, patients with glucose > 140 mg/dL: {}",
            report.processed,
            report.quarantined,
            state.get_u64(b"high")
        );
    }
    println!("the second run read nothing new and counted nothing twice");
    Ok(())
}
