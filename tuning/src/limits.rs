//! Process resource limits (`RLIMIT_NOFILE`, `RLIMIT_MEMLOCK`) and the sizing arithmetic behind
//! them: how much locked memory glommio's executors need, how many file descriptors a planned
//! number of sockets needs.
//!
//! Locked memory, as measured on Linux 6.18 (and matching the kernel's io_uring accounting):
//! each glommio 0.9 executor (one per shard) creates three io_uring rings (main, latency, poll)
//! and registers its `io_memory` buffer in each of them. Every ring and every registration is
//! charged to the *user's* locked-memory count (shared by all that user's processes) and checked
//! against `RLIMIT_MEMLOCK`, unless the process has `CAP_IPC_LOCK`. glommio also refuses to
//! build an executor when the limit is below 512 KiB, whatever the capabilities. A ring of depth
//! 128 costs 16 KiB, so one shard with the default 512 KiB of `io_memory` needs
//! 3 × (512 + 16) KiB = 1584 KiB, and the 8 MiB default limit holds five shards.

use crate::root::Root;

/// `RLIM_INFINITY` as we store it.
pub const UNLIMITED: u64 = u64::MAX;

/// glommio 0.9 refuses to create an executor below this memlock limit.
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;

/// io_uring rings per glommio executor (main, latency, poll); `io_memory` is registered in each.
pub const GLOMMIO_RINGS_PER_SHARD: u64 = 3;

/// glommio rounds `io_memory` up to this minimum.
const GLOMMIO_MIN_IO_MEMORY: u64 = 64 * 1024;

const PAGE: u64 = 4096;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A soft/hard limit pair; [`UNLIMITED`] stands for `RLIM_INFINITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rlim {
    pub soft: u64,
    pub hard: u64,
}

/// The limits the checks look at; `None` when they cannot be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub nofile: Option<Rlim>,
    pub memlock: Option<Rlim>,
}

/// Which resource a limit line is about.
#[derive(Debug, Clone, Copy)]
enum Resource {
    Nofile,
    Memlock,
}

impl Resource {
    /// The row label in `/proc/<pid>/limits`.
    fn label(self) -> &'static str {
        match self {
            Resource::Nofile => "Max open files",
            Resource::Memlock => "Max locked memory",
        }
    }
}

impl Limits {
    /// Reads this process's limits. On the live root they come from `getrlimit`, elsewhere (and
    /// as a fallback) from `<root>/proc/self/limits`.
    pub fn read(root: &Root) -> Self {
        let from_file = root
            .read("/proc/self/limits")
            .map(|t| parse_proc_limits(&t))
            .unwrap_or_default();
        if !root.is_live() {
            return from_file;
        }
        Self {
            nofile: getrlimit(libc::RLIMIT_NOFILE).or(from_file.nofile),
            memlock: getrlimit(libc::RLIMIT_MEMLOCK).or(from_file.memlock),
        }
    }
}

/// `getrlimit(2)` for one resource.
fn getrlimit(resource: libc::__rlimit_resource_t) -> Option<Rlim> {
    let mut raw = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes one `struct rlimit` through the pointer, which points at a
    // live, properly aligned and exclusively borrowed `libc::rlimit` for the whole call; it has
    // no other memory effects.
    let rc = unsafe { libc::getrlimit(resource, &mut raw) };
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            UNLIMITED
        } else {
            v
        }
    };
    (rc == 0).then(|| Rlim {
        soft: conv(raw.rlim_cur),
        hard: conv(raw.rlim_max),
    })
}

/// Parses the text of `/proc/<pid>/limits`; rows that do not parse are left out.
pub fn parse_proc_limits(text: &str) -> Limits {
    let row = |resource: Resource| -> Option<Rlim> {
        let line = text.lines().find(|l| l.starts_with(resource.label()))?;
        let mut words = line[resource.label().len()..].split_whitespace();
        let value = |w: Option<&str>| -> Option<u64> {
            match w? {
                "unlimited" => Some(UNLIMITED),
                n => n.parse().ok(),
            }
        };
        Some(Rlim {
            soft: value(words.next())?,
            hard: value(words.next())?,
        })
    };
    Limits {
        nofile: row(Resource::Nofile),
        memlock: row(Resource::Memlock),
    }
}

/// Rewrites the nofile and memlock rows of a `/proc/<pid>/limits` text (fixture trees only:
/// `apply` uses it to show what a restarted `iris-edge` would get).
pub fn rewrite_proc_limits(text: &str, nofile: u64, memlock: u64) -> String {
    let show = |v: u64| {
        if v == UNLIMITED {
            "unlimited".to_owned()
        } else {
            v.to_string()
        }
    };
    let mut out = String::new();
    for line in text.lines() {
        let resource = [Resource::Nofile, Resource::Memlock]
            .into_iter()
            .find(|r| line.starts_with(r.label()));
        match resource {
            Some(r) => {
                let (value, unit) = match r {
                    Resource::Nofile => (nofile, "files"),
                    Resource::Memlock => (memlock, "bytes"),
                };
                out.push_str(&format!(
                    "{:<26}{:<21}{:<21}{}\n",
                    r.label(),
                    show(value),
                    show(value),
                    unit
                ));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to).saturating_mul(to)
}

/// Locked memory one io_uring ring of `depth` entries costs: the SQE array plus the shared ring
/// (header, completion entries for twice the depth, submission index array), each page-rounded.
pub fn ring_bytes(depth: usize) -> u64 {
    let sq = (depth.max(1) as u64).next_power_of_two();
    let cq = 2 * sq;
    align_up(256 + cq * 16 + sq * 4, PAGE) + align_up(sq * 64, PAGE)
}

/// The `io_memory` glommio actually registers for a configured value.
pub fn effective_io_memory(io_memory_bytes: usize) -> u64 {
    align_up((io_memory_bytes as u64).max(GLOMMIO_MIN_IO_MEMORY), PAGE)
}

/// Locked memory one shard charges: its three rings and three registrations of `io_memory`.
pub fn memlock_per_shard(io_memory_bytes: usize, ring_depth: usize) -> u64 {
    GLOMMIO_RINGS_PER_SHARD * (ring_bytes(ring_depth) + effective_io_memory(io_memory_bytes))
}

/// Locked memory an edge with `shards` shards charges at startup.
pub fn memlock_needed(shards: usize, io_memory_bytes: usize, ring_depth: usize) -> u64 {
    (shards.max(1) as u64)
        .saturating_mul(memlock_per_shard(io_memory_bytes, ring_depth))
        .max(GLOMMIO_MIN_MEMLOCK)
}

/// The memlock limit `apply` sets: twice the need (room for a second edge of the same user
/// during a restart, since the kernel charges the user), a power of two, at least 64 MiB.
pub fn memlock_target(needed: u64) -> u64 {
    needed
        .saturating_mul(2)
        .checked_next_power_of_two()
        .unwrap_or(UNLIMITED)
        .max(64 * MIB)
}

/// The open-files limit for a planned number of sockets: a quarter more plus 16 Ki for the
/// store, rings, eventfds and admin connections, rounded up to a power of two.
pub fn nofile_target(connections: u64) -> u64 {
    (connections
        .saturating_add(connections / 4)
        .saturating_add(16 * KIB))
    .checked_next_power_of_two()
    .unwrap_or(UNLIMITED)
}

/// Bytes as a short human string (`1.5 MiB`, `512 KiB`, `unlimited`).
pub fn human_bytes(v: u64) -> String {
    if v == UNLIMITED {
        return "unlimited".to_owned();
    }
    let units = [("GiB", 1u64 << 30), ("MiB", MIB), ("KiB", KIB)];
    for (name, size) in units {
        if v >= size {
            let whole = v / size;
            let tenth = (v % size) * 10 / size;
            return if tenth == 0 {
                format!("{whole} {name}")
            } else {
                format!("{whole}.{tenth} {name}")
            };
        }
    }
    format!("{v} B")
}

/// A limit as a short string (`20000`, `unlimited`).
pub fn show_limit(v: u64) -> String {
    if v == UNLIMITED {
        "unlimited".to_owned()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max open files            20000                20000                files     
Max locked memory         8388608              unlimited            bytes     
";

    #[test]
    fn parses_proc_limits() {
        let l = parse_proc_limits(LIMITS);
        assert_eq!(
            l.nofile,
            Some(Rlim {
                soft: 20000,
                hard: 20000
            })
        );
        assert_eq!(
            l.memlock,
            Some(Rlim {
                soft: 8 << 20,
                hard: UNLIMITED
            })
        );
        assert_eq!(
            parse_proc_limits("garbage\nMax open files  x y"),
            Limits::default()
        );
    }

    #[test]
    fn rewrites_proc_limits() {
        let text = rewrite_proc_limits(LIMITS, 1 << 20, UNLIMITED);
        let l = parse_proc_limits(&text);
        assert_eq!(l.nofile.unwrap().hard, 1 << 20);
        assert_eq!(l.memlock.unwrap().soft, UNLIMITED);
        assert!(text.starts_with("Limit "));
    }

    #[test]
    fn memlock_arithmetic_matches_measurement() {
        // Measured on Linux 6.18: a depth-128 ring costs more than 13 KiB and at most 16 KiB.
        assert_eq!(ring_bytes(128), 16 * KIB);
        assert_eq!(memlock_per_shard(512 * 1024, 128), 1584 * KIB);
        // 8 MiB holds five default shards, not six.
        assert!(memlock_needed(5, 512 * 1024, 128) <= 8 * MIB);
        assert!(memlock_needed(6, 512 * 1024, 128) > 8 * MIB);
        assert_eq!(effective_io_memory(1000), 64 * KIB);
        assert_eq!(memlock_target(memlock_needed(2, 512 * 1024, 128)), 64 * MIB);
        assert_eq!(memlock_target(100 * MIB), 256 * MIB);
    }

    #[test]
    fn nofile_targets() {
        assert_eq!(nofile_target(300_000), 524_288);
        assert_eq!(nofile_target(600_000), 1_048_576);
        assert_eq!(nofile_target(u64::MAX), UNLIMITED);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(1584 * KIB), "1.5 MiB");
        assert_eq!(human_bytes(512 * KIB), "512 KiB");
        assert_eq!(human_bytes(UNLIMITED), "unlimited");
        assert_eq!(human_bytes(10), "10 B");
    }
}
