//! Host checks at startup: io_uring must work and the memlock limit must cover every shard's
//! registered memory. Each problem is logged once with what to change; the ones that make the
//! edge unable to run stop startup with a clear error.

use anyhow::bail;
use tracing::warn;

use crate::config::EdgeConfig;

/// Locked memory one glommio executor needs beyond its I/O buffers (its rings), an estimate
/// with headroom: three rings of `ring_depth` entries.
pub fn ring_memlock_bytes(ring_depth: usize) -> usize {
    3 * ring_depth * 128 + 64 * 1024
}

/// Locked memory all shards need.
pub fn memlock_needed(cfg: &EdgeConfig, shards: usize) -> usize {
    shards * (cfg.io_memory_bytes + ring_memlock_bytes(cfg.ring_depth))
}

/// Runs the startup checks; errors only for what makes serving impossible.
pub fn startup(cfg: &EdgeConfig, shards: usize) -> anyhow::Result<()> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            bail!("io_uring is disabled (kernel.io_uring_disabled = 2): set it to 0 with `sysctl -w kernel.io_uring_disabled=0`");
        }
    }
    if let Err(e) = io_uring::IoUring::new(8) {
        bail!("io_uring is not available ({e}): iris-edge needs Linux 5.8 or later with io_uring enabled");
    }
    let needed = memlock_needed(cfg, shards) as u64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the two fields of the `rlimit` we pass by valid pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed {
        bail!(
            "memlock limit {} bytes is below the {} bytes {} shards need (io_memory_bytes = {} each): \
             raise it (`ulimit -l`, LimitMEMLOCK=) or lower shards / io_memory_bytes",
            lim.rlim_cur,
            needed,
            shards,
            cfg.io_memory_bytes
        );
    }
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    if rc == 0 && nofile.rlim_cur != libc::RLIM_INFINITY && nofile.rlim_cur < 100_000 {
        warn!(
            current = nofile.rlim_cur,
            wanted = 1_048_576u64,
            "open-file limit caps the connections this edge can hold"
        );
    }
    Ok(())
}
