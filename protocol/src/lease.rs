//! The leadership lease of highly available aggregators, as a pure state machine.
//!
//! Several aggregator instances share one replicated key-value bucket (NATS JetStream, in
//! `medfed-aggregator`'s driver). One key, the *lease*, names the active instance; every write
//! to the bucket is conditional on the bucket's last sequence number (a total order), so:
//!
//! - **Taking over** is a compare-and-set on the lease key's revision: of several standbys
//!   only one succeeds, and only if the lease has not been renewed since it was read.
//! - **Renewing** and **every state write** of the active instance expect the bucket's last
//!   sequence to be the one its own previous write produced. The first write of anyone else
//!   (a standby's takeover) makes every later write of the former active fail: it is *fenced*
//!   and can never overwrite the new active's state, however long it was paused.
//! - **Acting** (sending to nodes, releasing a model) needs, besides the fence, a lease that
//!   has not run out by the instance's own monotonic clock. A renewal sent at `t` holds until
//!   `t + duration - margin`; a standby takes over only after seeing the same revision for
//!   `duration` by *its* clock, having first seen it after it was written (after `t`), so
//!   the two windows do not overlap while the clocks' rates differ by less than
//!   `margin / duration` (a tenth by default).
//!
//! Time comes in as milliseconds of the driver's monotonic clock; nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// What the lease key holds: who is active, where nodes reach it, and for how long a
/// renewal holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The active instance's name (`[ha] instance`).
    pub holder: String,
    /// The `host:port` nodes dial to reach it (`[ha] advertise`).
    pub advertise: String,
    /// How long a renewal holds, in milliseconds.
    pub duration_ms: u64,
}

/// The lease's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a renewal holds, in milliseconds.
    pub duration_ms: u64,
}

impl LeaseTiming {
    /// How often the active instance renews: three times per duration, so that two lost
    /// renewals in a row still leave it active.
    pub fn renew_every_ms(self) -> u64 {
        (self.duration_ms / 3).max(1)
    }

    /// The part of the duration the active instance gives up, for clocks whose rates differ.
    pub fn margin_ms(self) -> u64 {
        self.duration_ms / 10
    }
}

/// What a standby should do after reading the lease key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The lease is held (or was renewed since last read): read it again later.
    Wait {
        /// The current holder, and where nodes reach it.
        holder: Option<LeaseRecord>,
    },
    /// Nobody ever held the lease: create the key (succeeds only if it still does not exist).
    Create,
    /// The lease ran out: take it over by a compare-and-set on this revision.
    TakeOver {
        /// The lease key's revision that must still be the last.
        revision: u64,
    },
}

/// The role of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease.
    Standby,
    /// Holding the lease.
    Active,
    /// Lost the lease after holding it (fenced, or not renewed in time): acts no more.
    SteppedDown,
}

/// One instance's view of the lease.
#[derive(Debug, Clone)]
pub struct Lease {
    timing: LeaseTiming,
    role: Role,
    /// Standby: the lease key's revision last read, and when it was first seen.
    seen: Option<(u64, u64)>,
    /// Active: the bucket's last sequence, written by this instance.
    last_seq: u64,
    /// Active: the sequence of the write that took the lease (the epoch; nodes and logs
    /// tell the leaderships apart by it).
    epoch: u64,
    /// Active: acting is allowed strictly before this time.
    valid_until_ms: u64,
    /// Active: when the last renewal was sent.
    renewed_at_ms: u64,
}

impl Lease {
    /// A standby with these timings.
    pub fn new(timing: LeaseTiming) -> Lease {
        Lease {
            timing,
            role: Role::Standby,
            seen: None,
            last_seq: 0,
            epoch: 0,
            valid_until_ms: 0,
            renewed_at_ms: 0,
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The sequence of the write that took the lease (0 before).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A standby read the lease key at `now`: `current` is its revision and record, or
    /// `None` when the key does not exist. A lease is taken over once its revision stayed
    /// the same for the longer of its holder's duration and this instance's own.
    pub fn observe(&mut self, now: u64, current: Option<(u64, LeaseRecord)>) -> Decision {
        if self.role != Role::Standby {
            return Decision::Wait { holder: None };
        }
        let Some((revision, record)) = current else {
            self.seen = None;
            return Decision::Create;
        };
        match self.seen {
            Some((r, since)) if r == revision => {
                let hold = record.duration_ms.max(self.timing.duration_ms);
                if now.saturating_sub(since) >= hold {
                    Decision::TakeOver { revision }
                } else {
                    Decision::Wait {
                        holder: Some(record),
                    }
                }
            }
            _ => {
                self.seen = Some((revision, now));
                Decision::Wait {
                    holder: Some(record),
                }
            }
        }
    }

    /// The create or compare-and-set sent at `sent_at` succeeded as bucket sequence `seq`:
    /// this instance is active.
    pub fn acquired(&mut self, sent_at: u64, seq: u64) {
        if self.role != Role::Standby || seq == 0 {
            return;
        }
        self.role = Role::Active;
        self.epoch = seq;
        self.last_seq = seq;
        self.seen = None;
        self.extend(sent_at);
    }

    fn extend(&mut self, sent_at: u64) {
        self.renewed_at_ms = sent_at;
        self.valid_until_ms =
            (sent_at + self.timing.duration_ms).saturating_sub(self.timing.margin_ms());
    }

    /// Whether a renewal is due at `now`.
    pub fn renewal_due(&self, now: u64) -> bool {
        self.role == Role::Active && now >= self.renewed_at_ms + self.timing.renew_every_ms()
    }

    /// The bucket sequence this instance's next write must find last, while active.
    pub fn expected_seq(&self) -> Option<u64> {
        (self.role == Role::Active).then_some(self.last_seq)
    }

    /// A renewal sent at `sent_at` was stored as sequence `seq`. A sequence of 0 (no
    /// confirmation) changes nothing: expecting 0 would switch the fence off.
    pub fn renewed(&mut self, sent_at: u64, seq: u64) {
        if self.role == Role::Active && seq > 0 {
            self.last_seq = seq;
            self.extend(sent_at);
        }
    }

    /// A state write was stored as sequence `seq` (the lease's validity is unchanged).
    pub fn wrote(&mut self, seq: u64) {
        if self.role == Role::Active && seq > 0 {
            self.last_seq = seq;
        }
    }

    /// A write was refused because the bucket's last sequence was not ours: someone else
    /// wrote, so another instance holds the lease now.
    pub fn fenced(&mut self) {
        if self.role == Role::Active {
            self.role = Role::SteppedDown;
        }
    }

    /// Whether this instance may act at `now`: active, and its last renewal still holds.
    /// Past that time it steps down for good (the driver starts a new standby).
    pub fn is_active(&mut self, now: u64) -> bool {
        if self.role == Role::Active && now >= self.valid_until_ms {
            self.role = Role::SteppedDown;
        }
        self.role == Role::Active
    }

    /// Until when (driver's clock, ms) acting is allowed, while active.
    pub fn valid_until(&self) -> Option<u64> {
        (self.role == Role::Active).then_some(self.valid_until_ms)
    }
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const TIMING: LeaseTiming = LeaseTiming { duration_ms: 3000 };

    fn record(holder: &str) -> LeaseRecord {
        LeaseRecord {
            holder: holder.into(),
            advertise: format!("{holder}:4433"),
            duration_ms: TIMING.duration_ms,
        }
    }

    #[test]
    fn a_standby_takes_over_only_after_the_revision_stayed_a_whole_duration() {
        let mut l = Lease::new(TIMING);
        assert_eq!(l.observe(0, None), Decision::Create);
        assert!(matches!(
            l.observe(100, Some((5, record("a")))),
            Decision::Wait { .. }
        ));
        assert!(matches!(
            l.observe(3099, Some((5, record("a")))),
            Decision::Wait { .. }
        ));
        // Renewed meanwhile: the wait starts again.
        assert!(matches!(
            l.observe(3000, Some((7, record("a")))),
            Decision::Wait { .. }
        ));
        assert!(matches!(
            l.observe(5999, Some((7, record("a")))),
            Decision::Wait { .. }
        ));
        assert_eq!(
            l.observe(6000, Some((7, record("a")))),
            Decision::TakeOver { revision: 7 }
        );
        l.acquired(6000, 9);
        assert_eq!(
            (l.role(), l.epoch(), l.expected_seq()),
            (Role::Active, 9, Some(9))
        );
        assert_eq!(l.valid_until(), Some(6000 + 3000 - 300));
    }

    #[test]
    fn a_holder_that_announces_a_longer_duration_is_waited_for_that_long() {
        let mut l = Lease::new(TIMING);
        let long = LeaseRecord {
            duration_ms: 10_000,
            ..record("a")
        };
        l.observe(0, Some((1, long.clone())));
        assert!(matches!(
            l.observe(9_999, Some((1, long.clone()))),
            Decision::Wait { .. }
        ));
        assert_eq!(
            l.observe(10_000, Some((1, long))),
            Decision::TakeOver { revision: 1 }
        );
    }

    #[test]
    fn an_active_instance_steps_down_when_fenced_or_not_renewed_in_time() {
        let mut l = Lease::new(TIMING);
        l.acquired(0, 1);
        assert!(!l.renewal_due(999));
        assert!(l.renewal_due(1000));
        l.renewed(1000, 2);
        assert!(l.is_active(3699));
        assert!(!l.is_active(3700), "a renewal holds duration - margin");
        assert_eq!(l.role(), Role::SteppedDown);
        // Stepping down is for good, and so is being fenced.
        l.renewed(3800, 3);
        assert!(!l.is_active(3800));
        let mut l = Lease::new(TIMING);
        l.acquired(0, 1);
        l.fenced();
        assert!(!l.is_active(1));
        assert_eq!(l.expected_seq(), None);
    }

    #[test]
    fn a_sequence_of_zero_is_no_confirmation() {
        let mut l = Lease::new(TIMING);
        l.acquired(0, 0);
        assert_eq!(l.role(), Role::Standby);
        l.acquired(0, 4);
        l.wrote(0);
        l.renewed(2000, 0);
        assert_eq!(
            l.expected_seq(),
            Some(4),
            "expecting 0 would switch the fence off"
        );
        assert_eq!(l.valid_until(), Some(2700));
    }

    /// The bucket, as the driver sees it: a total order of writes, with the two
    /// conditions the driver uses.
    #[derive(Default)]
    struct Bucket {
        seq: u64,
        lease: Option<(u64, LeaseRecord)>,
        /// The owner (instance index) of every state write, in order.
        writes: Vec<usize>,
    }

    impl Bucket {
        fn cas_lease(&mut self, expect: Option<u64>, rec: LeaseRecord) -> Option<u64> {
            if self.lease.as_ref().map(|(r, _)| *r) != expect {
                return None;
            }
            self.seq += 1;
            self.lease = Some((self.seq, rec));
            Some(self.seq)
        }
        fn fenced_write(&mut self, expect: u64, lease: Option<LeaseRecord>) -> Option<u64> {
            if self.seq != expect {
                return None;
            }
            self.seq += 1;
            if let Some(rec) = lease {
                self.lease = Some((self.seq, rec));
            }
            Some(self.seq)
        }
    }

    /// Instances with clocks of slightly different rates, paused at random for up to
    /// twice the lease, with writes delayed at random: at no moment do two running
    /// instances both believe they may act, and every state write stored comes from the
    /// instance the lease named when it was stored.
    #[test]
    fn seeded_simulation_never_has_two_active_instances() {
        /// A write on its way to the bucket.
        struct Write {
            lands_at: u64,
            instance: usize,
            sent_at: u64,
            kind: Kind,
        }
        enum Kind {
            /// Create (`None`) or compare-and-set on this lease revision.
            Take(Option<u64>),
            Renew,
            State,
        }
        let mut takeovers = 0;
        for seed in 0..100u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let n = rng.random_range(2..5usize);
            // Clock rates within ±4% of real time (the margin allows about ±5%).
            let rates: Vec<f64> = (0..n).map(|_| rng.random_range(0.96..1.04)).collect();
            let local = |i: usize, t: u64| (t as f64 * rates[i]) as u64;
            let mut leases: Vec<Lease> = (0..n).map(|_| Lease::new(TIMING)).collect();
            let mut paused_until = vec![0u64; n];
            let mut in_flight: Vec<Write> = Vec::new();
            let mut bucket = Bucket::default();
            let mut epochs = std::collections::BTreeSet::new();
            for t in (0..120_000u64).step_by(10) {
                in_flight.sort_by_key(|w| w.lands_at);
                while in_flight.first().is_some_and(|w| w.lands_at <= t) {
                    let w = in_flight.remove(0);
                    let l = &mut leases[w.instance];
                    let me = record(&w.instance.to_string());
                    match w.kind {
                        Kind::Take(expect) => {
                            if let Some(seq) = bucket.cas_lease(expect, me) {
                                l.acquired(w.sent_at, seq);
                            }
                        }
                        Kind::Renew | Kind::State => {
                            let Some(expect) = l.expected_seq() else {
                                continue;
                            };
                            let renew = matches!(w.kind, Kind::Renew);
                            match bucket.fenced_write(expect, renew.then_some(me)) {
                                Some(seq) if renew => l.renewed(w.sent_at, seq),
                                Some(seq) => {
                                    let holder =
                                        bucket.lease.as_ref().map(|(_, r)| r.holder.clone());
                                    assert_eq!(
                                        holder,
                                        Some(w.instance.to_string()),
                                        "seed {seed}: a write of a non-holder was stored"
                                    );
                                    bucket.writes.push(w.instance);
                                    l.wrote(seq);
                                }
                                None => l.fenced(),
                            }
                        }
                    }
                }
                for i in 0..n {
                    if t < paused_until[i] {
                        continue;
                    }
                    if rng.random_bool(0.002) {
                        paused_until[i] = t + rng.random_range(0..2 * TIMING.duration_ms);
                        continue;
                    }
                    let now = local(i, t);
                    let lands_at = t + rng.random_range(0..50);
                    let l = &mut leases[i];
                    let kind = match l.role() {
                        Role::Standby => match l.observe(now, bucket.lease.clone()) {
                            Decision::Create => Some(Kind::Take(None)),
                            Decision::TakeOver { revision } => Some(Kind::Take(Some(revision))),
                            Decision::Wait { .. } => None,
                        },
                        Role::Active if l.is_active(now) => {
                            epochs.insert(l.epoch());
                            if l.renewal_due(now) {
                                Some(Kind::Renew)
                            } else {
                                rng.random_bool(0.05).then_some(Kind::State)
                            }
                        }
                        Role::SteppedDown => {
                            *l = Lease::new(TIMING);
                            None
                        }
                        Role::Active => None,
                    };
                    if let Some(kind) = kind {
                        in_flight.push(Write {
                            lands_at,
                            instance: i,
                            sent_at: now,
                            kind,
                        });
                    }
                }
                let active: Vec<usize> = (0..n)
                    .filter(|&i| t >= paused_until[i] && leases[i].is_active(local(i, t)))
                    .collect();
                assert!(
                    active.len() <= 1,
                    "seed {seed}: instances {active:?} both active at {t} ms"
                );
            }
            assert!(
                bucket.writes.len() > 100,
                "seed {seed}: the simulation made no progress"
            );
            takeovers += epochs.len();
        }
        // Pauses longer than the lease happened, and others took over.
        assert!(
            takeovers > 40 * 3,
            "only {takeovers} leaderships in 40 runs"
        );
    }
}
