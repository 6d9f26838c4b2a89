//! Time as the protocol sees it: milliseconds of a clock its driver chooses (janus's
//! `core/src/time.rs` pattern). The state machines of this crate never read a clock; they
//! are handed `now`. A driver reads it from a [`Clock`]: the aggregator from the monotonic
//! clock of its process, the simulation (`tests/sim.rs`) and unit tests from a
//! [`MockClock`] they move by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of `now`, in milliseconds since a start of the driver's choosing; never goes
/// back.
pub trait Clock: Send + Sync {
    /// Milliseconds since the clock's start.
    fn now_ms(&self) -> u64;
}

/// A clock that moves only when told: for simulations and tests. Clones share the time.
#[derive(Debug, Clone, Default)]
pub struct MockClock(Arc<AtomicU64>);

impl MockClock {
    /// A clock at `start_ms`.
    pub fn new(start_ms: u64) -> MockClock {
        MockClock(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Moves the clock to `ms`, if that is later than now (time never goes back).
    pub fn advance_to(&self, ms: u64) {
        self.0.fetch_max(ms, Ordering::SeqCst);
    }
}

impl Clock for MockClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mock_clock_moves_only_forward_and_is_shared() {
        let c = MockClock::new(5);
        let other = c.clone();
        c.advance(10);
        assert_eq!(other.now_ms(), 15);
        c.advance_to(12);
        assert_eq!(c.now_ms(), 15, "time never goes back");
        c.advance_to(40);
        assert_eq!(other.now_ms(), 40);
    }
}
