//! A global allocator that forwards to the system allocator and, while a thread is inside
//! [`metered`], counts the bytes that thread holds. `medfed bench secagg` uses it to measure
//! the aggregator's peak memory while clients run in the same process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

thread_local! {
    static METERED: Cell<bool> = const { Cell::new(false) };
}

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

pub struct Meter;

fn metering() -> bool {
    METERED.try_with(Cell::get).unwrap_or(false)
}

fn add(delta: isize) {
    let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the meter only counts.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if metering() {
            add(layout.size() as isize);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if metering() {
            add(layout.size() as isize);
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if metering() {
            add(new_size as isize - layout.size() as isize);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if metering() {
            add(-(layout.size() as isize));
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` with this thread's allocations counted.
pub fn metered<R>(f: impl FnOnce() -> R) -> R {
    let before = METERED.with(|m| m.replace(true));
    let r = f();
    METERED.with(|m| m.set(before));
    r
}

/// Counts `bytes` allocated under the meter as handed over to code outside it (which will
/// free them unmetered).
pub fn release(bytes: usize) {
    LIVE.fetch_sub(bytes as isize, Ordering::Relaxed);
}

/// Starts a new measurement.
pub fn reset() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
}

/// The most bytes held at once by metered code since [`reset`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed).max(0) as usize
}
