//! Returning freed memory to the operating system from idle shards.
//!
//! The edge runs on mimalloc. mimalloc gives pages a thread freed back to the kernel only when
//! that thread allocates or frees again, so a shard that goes quiet after a burst (a login storm,
//! a drain) keeps the burst's freed pages resident. Each shard therefore asks mimalloc to collect
//! its own heap about once a second while it is idle — never on the per-message path.

/// Lets mimalloc return the calling thread's free pages to the OS (not forced: cheap).
pub fn collect_idle_heap() {
    // SAFETY: `mi_collect` takes a plain bool, touches only mimalloc's own heap structures for
    // the calling thread (and abandoned segments, under mimalloc's internal locks), and is
    // documented as callable at any time from any thread. It never frees memory still in use.
    unsafe { libmimalloc_sys::mi_collect(false) }
}
