//! Counting global allocators for measurements, kept out of production builds: the `medfed`
//! command installs [`Meter`] only with its cargo feature `alloc-meter` (which `medfed bench
//! secagg` needs for the aggregator's memory), and the integration tests
//! (`tests/integration`) install [`Largest`]. Both forward every call unchanged to the system allocator and only count.
//!
//! This crate is the workspace's one place with `unsafe` code: implementing
//! [`GlobalAlloc`] is unsafe by definition.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

thread_local! {
    static METERED: Cell<bool> = const { Cell::new(false) };
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that, while a thread is inside [`metered`], counts the bytes that
/// thread holds, so [`peak`] is the most that metered code held at once.
pub struct Meter;

fn metering() -> bool {
    METERED.try_with(Cell::get).unwrap_or(false)
}

fn add(delta: isize) {
    let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// A size as a signed count (allocations never exceed `isize::MAX` bytes).
fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the meter only counts.
#[allow(unsafe_code, reason = "a GlobalAlloc impl is unsafe by definition")]
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if metering() {
            add(signed(layout.size()));
        }
        // SAFETY: the caller's guarantees for `layout` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if metering() {
            add(signed(layout.size()));
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if metering() {
            add(signed(new_size) - signed(layout.size()));
        }
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if metering() {
            add(-signed(layout.size()));
        }
        // SAFETY: as in `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` with this thread's allocations counted (under [`Meter`]).
pub fn metered<R>(f: impl FnOnce() -> R) -> R {
    let before = METERED.with(|m| m.replace(true));
    let r = f();
    METERED.with(|m| m.set(before));
    r
}

/// Counts `bytes` allocated under the meter as handed over to code outside it (which will
/// free them unmetered).
pub fn release(bytes: usize) {
    LIVE.fetch_sub(signed(bytes), Ordering::Relaxed);
}

/// Starts a new measurement.
pub fn reset() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
}

/// The most bytes held at once by metered code since [`reset`].
pub fn peak() -> usize {
    usize::try_from(PEAK.load(Ordering::Relaxed)).unwrap_or(0)
}

/// A global allocator that records the largest single allocation (or reallocation) asked
/// for on the threads that called [`watch_this_thread`]: [`largest`]. Other threads (other
/// tests of the same binary) are not recorded.
pub struct Largest;

/// Has [`Largest`] record this thread's allocations from now on (for a thread of the code
/// under test, such as an async runtime's `on_thread_start`).
pub fn watch_this_thread() {
    WATCHED.with(|w| w.set(true));
}

fn record_largest(size: usize) {
    if WATCHED.try_with(Cell::get).unwrap_or(false) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
#[allow(unsafe_code, reason = "a GlobalAlloc impl is unsafe by definition")]
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_largest(layout.size());
        // SAFETY: the caller's guarantees for `layout` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_largest(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_largest(new_size);
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// The largest single allocation made under [`Largest`] on a watched thread so far, in
/// bytes.
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(
        unsafe_code,
        reason = "calls the allocator's unsafe methods directly to test it"
    )]
    fn the_meter_counts_only_metered_code() {
        // Not installed as the global allocator here: call it directly.
        let layout = Layout::from_size_align(1000, 8).unwrap();
        reset();
        // SAFETY: a non-zero layout, freed with the same layout.
        unsafe {
            let p = Meter.alloc(layout);
            Meter.dealloc(p, layout);
        }
        assert_eq!(peak(), 0);
        metered(|| {
            // SAFETY: as above.
            unsafe {
                let p = Meter.alloc(layout);
                Meter.dealloc(p, layout);
            }
        });
        assert_eq!(peak(), 1000);
    }

    #[test]
    #[allow(
        unsafe_code,
        reason = "calls the allocator's unsafe methods directly to test it"
    )]
    fn largest_records_only_the_threads_watched() {
        // Called directly, as above.
        let big = Layout::from_size_align(1 << 20, 8).unwrap();
        let allocate = move || {
            // SAFETY: a non-zero layout, freed with the same layout.
            unsafe {
                let p = Largest.alloc(big);
                Largest.dealloc(p, big);
            }
        };
        std::thread::spawn(allocate).join().unwrap();
        assert!(largest() < 1 << 20);
        std::thread::spawn(move || {
            watch_this_thread();
            allocate();
        })
        .join()
        .unwrap();
        assert_eq!(largest(), 1 << 20);
    }
}
