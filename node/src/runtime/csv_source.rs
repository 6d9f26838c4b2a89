//! The CSV connector: a file is one partition; the offset of a row is its index among the
//! data rows (the header excluded). Rows are read on their own thread and handed over in
//! batches through a bounded channel (back-pressure).

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use super::Envelope;

/// Envelopes per batch, and batches in flight.
const BATCH: usize = 1024;
const IN_FLIGHT: usize = 16;

/// Starts reading `path` from data row `from`; returns the header and the envelopes.
pub fn read(
    path: &Path,
    stream: &str,
    partition: u32,
    from: u64,
) -> std::io::Result<(Vec<String>, Receiver<Vec<Envelope>>)> {
    let file = std::fs::File::open(path)?;
    let mut lines = std::io::BufReader::with_capacity(1 << 20, file).split(b'\n');
    let header = match lines.next() {
        Some(h) => String::from_utf8_lossy(&h?)
            .trim_end_matches('\r')
            .split(',')
            .map(|c| c.trim().to_string())
            .collect(),
        None => Vec::new(),
    };
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let stream: Arc<str> = stream.into();
    std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(BATCH);
        for (i, line) in lines.enumerate() {
            let offset = i as u64;
            let Ok(mut line) = line else { break };
            if offset < from {
                continue;
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            batch.push(Envelope {
                stream: stream.clone(),
                partition,
                offset,
                key: None,
                payload: line,
            });
            if batch.len() == BATCH
                && tx
                    .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                    .is_err()
            {
                return; // the task stopped
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(batch);
        }
    });
    Ok((header, rx))
}
