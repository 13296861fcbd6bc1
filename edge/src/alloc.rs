//! Returning freed memory to the operating system from idle shards.
//!
//! The edge runs on mimalloc. mimalloc gives pages a thread freed back to the kernel only when
//! that thread allocates or frees again, so a shard that goes quiet after a burst (a login storm,
//! a drain) keeps the burst's freed pages resident. Each shard therefore asks mimalloc to collect
//! its own heap about once a second while it is idle — never on the per-message path — and the
//! embedded core thread does the same once per idle period (`EmbeddedConfig::idle_hook`): it
//! frees a burst's requests and store batches. Measured with 20,000 messages of 1 KiB to a
//! reader that never reads (`tests/tests/slow_consumer.rs`), the edge's resident growth four
//! seconds after the burst was 44–58 MB without the core's collection and 31–42 MB with it.
//!
//! mimalloc is built with `MI_NO_THP` (the `no_thp` feature of `libmimalloc-sys`): with
//! transparent huge pages advised on its arena, the kernel's `khugepaged` filled partly used
//! 2 MiB pages in the background and an idle edge's resident memory grew by megabytes with
//! nothing running.

/// Lets mimalloc return the calling thread's free pages to the OS (not forced: cheap).
pub fn collect_idle_heap() {
    // SAFETY: `mi_collect` takes a plain bool, touches only mimalloc's own heap structures for
    // the calling thread (and abandoned segments, under mimalloc's internal locks), and is
    // documented as callable at any time from any thread. It never frees memory still in use.
    unsafe { libmimalloc_sys::mi_collect(false) }
}
