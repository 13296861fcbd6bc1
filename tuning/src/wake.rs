//! Live wake-up probe: how much CPU is a thread charged each time it is woken on a CPU that
//! went idle?
//!
//! An edge shard with nothing to do sleeps, and each message that arrives at a sleeping shard
//! costs a wake-up. On bare metal that is a few µs of CPU; on some hosts (nested virtualization,
//! slow idle exits) it is ten times more, and sparse traffic then costs far more CPU per message
//! (the `wakeup` check in `checks` says so and points at `batch_wait_us`). The probe pins a
//! sleeper thread and a waker thread to two different CPUs and ping-pongs one byte over two
//! pipes: the waker sleeps 200 µs first, so the sleeper's CPU is idle when the byte arrives, and
//! the sleeper's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`) over the measured rounds is what a
//! wake-up costs it. Takes about 0.15 s. Only the live root is probed; a fixture tree reports
//! "not probed".

use std::io::{PipeReader, PipeWriter, Read, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Rounds run before measuring (first wake-ups, page faults, the threads settling on their CPUs).
const WARMUP_ROUNDS: u32 = 20;
/// Rounds measured.
pub const ROUNDS: u32 = 400;
/// How long the waker sleeps before each wake-up, so the sleeper's CPU goes idle (the edge's
/// default `batch_wait_us`).
const IDLE: Duration = Duration::from_micros(200);

/// What we know about the cost of a wake-up from idle on this host.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WakeStatus {
    /// Not probed (fixture tree, or probing switched off).
    NotProbed,
    /// The probe could not run (fewer than two CPUs allowed, or a syscall failed).
    Unavailable { reason: String },
    /// Measured: the CPU time charged to the woken thread per wake-up, averaged over `rounds`.
    Measured { cpu_us_per_wake: f64, rounds: u32 },
}

/// Measures the CPU time charged to a thread per wake-up from idle, with two threads pinned to
/// the first two CPUs this thread may run on. Never panics; whatever fails is `Unavailable`.
pub fn probe() -> WakeStatus {
    match measure() {
        Ok(cpu_ns) => WakeStatus::Measured {
            cpu_us_per_wake: cpu_ns as f64 / 1000.0 / f64::from(ROUNDS),
            rounds: ROUNDS,
        },
        Err(reason) => WakeStatus::Unavailable { reason },
    }
}

/// Why one of the probe's threads stopped.
#[derive(Debug)]
enum Stop {
    /// The other thread closed its pipe ends (it stopped first, and says why).
    PeerGone,
    /// This thread failed.
    Failed(String),
}

impl Stop {
    fn io(what: &str, e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Stop::PeerGone
        } else {
            Stop::Failed(format!("{what}: {e}"))
        }
    }
}

/// The sleeper thread's CPU time over the measured rounds, in nanoseconds.
fn measure() -> Result<u64, String> {
    let cpus = allowed_cpus()?;
    let [sleeper_cpu, waker_cpu, ..] = cpus[..] else {
        return Err(format!(
            "needs two CPUs this process may run on, has {}",
            cpus.len()
        ));
    };
    let pipe = || std::io::pipe().map_err(|e| format!("pipe: {e}"));
    let (to_sleeper_rx, to_sleeper_tx) = pipe()?;
    let (to_waker_rx, to_waker_tx) = pipe()?;
    // Each thread owns its two ends, so a thread that stops closes them and the other sees end
    // of file on its next read instead of blocking forever. These extra read ends, held until
    // both threads are joined, keep every write finding a reader: no EPIPE, no SIGPIPE.
    let _readers = (
        to_sleeper_rx
            .try_clone()
            .map_err(|e| format!("dup pipe: {e}"))?,
        to_waker_rx
            .try_clone()
            .map_err(|e| format!("dup pipe: {e}"))?,
    );
    let sleeper = spawn("iris-wake-sleep", move || {
        sleeper(sleeper_cpu, to_sleeper_rx, to_waker_tx)
    })?;
    // If this spawn fails its closure is dropped with the waker's ends, and the sleeper stops.
    let waker = spawn("iris-wake-wake", move || {
        waker(waker_cpu, to_sleeper_tx, to_waker_rx)
    });
    let slept = join(sleeper);
    let woke = waker.map_err(Stop::Failed).and_then(join);
    match (slept, woke) {
        (Ok(ns), Ok(())) => Ok(ns),
        (Err(Stop::Failed(why)), _) | (_, Err(Stop::Failed(why))) => Err(why),
        _ => Err("the probe threads stopped early".to_owned()),
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, Stop> + Send + 'static,
) -> Result<JoinHandle<Result<T, Stop>>, String> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|e| format!("spawning a probe thread: {e}"))
}

fn join<T>(handle: JoinHandle<Result<T, Stop>>) -> Result<T, Stop> {
    handle
        .join()
        .unwrap_or_else(|_| Err(Stop::Failed("a probe thread panicked".to_owned())))
}

/// Pinned to `cpu`: answers every byte from `rx` with one on `tx`; returns its own CPU time
/// over the measured rounds.
fn sleeper(cpu: usize, mut rx: PipeReader, mut tx: PipeWriter) -> Result<u64, Stop> {
    pin(cpu).map_err(Stop::Failed)?;
    let mut byte = [0u8; 1];
    let mut round = |rx: &mut PipeReader, tx: &mut PipeWriter| -> Result<(), Stop> {
        rx.read_exact(&mut byte)
            .map_err(|e| Stop::io("sleeper read", &e))?;
        tx.write_all(&byte)
            .map_err(|e| Stop::io("sleeper write", &e))
    };
    for _ in 0..WARMUP_ROUNDS {
        round(&mut rx, &mut tx)?;
    }
    let start = thread_cpu_ns().map_err(Stop::Failed)?;
    for _ in 0..ROUNDS {
        round(&mut rx, &mut tx)?;
    }
    let end = thread_cpu_ns().map_err(Stop::Failed)?;
    Ok(end.saturating_sub(start))
}

/// Pinned to `cpu`: per round, sleeps [`IDLE`], wakes the sleeper and waits for its answer.
fn waker(cpu: usize, mut tx: PipeWriter, mut rx: PipeReader) -> Result<(), Stop> {
    pin(cpu).map_err(Stop::Failed)?;
    let mut byte = [1u8; 1];
    for _ in 0..WARMUP_ROUNDS + ROUNDS {
        std::thread::sleep(IDLE);
        tx.write_all(&byte)
            .map_err(|e| Stop::io("waker write", &e))?;
        rx.read_exact(&mut byte)
            .map_err(|e| Stop::io("waker read", &e))?;
    }
    Ok(())
}

/// The CPUs the calling thread may run on, lowest first.
fn allowed_cpus() -> Result<Vec<usize>, String> {
    crate::facts::affinity_cpus().map_err(|e| format!("sched_getaffinity: {e}"))
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), String> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        Ok(())
    } else {
        Err(format!("pinning a probe thread to CPU {cpu} failed"))
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> Result<u64, String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one `struct timespec` through the pointer, which points
    // at a live, aligned and exclusively borrowed `libc::timespec` for the whole call; it has no
    // other memory effects.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Err(format!(
            "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}",
            std::io::Error::last_os_error()
        ));
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_measures_when_two_cpus_are_allowed() {
        let cpus = allowed_cpus().unwrap();
        let status = probe();
        if cpus.len() >= 2 {
            let WakeStatus::Measured {
                cpu_us_per_wake,
                rounds,
            } = status
            else {
                panic!("{status:?} with CPUs {cpus:?}");
            };
            assert!(
                cpu_us_per_wake > 0.0 && cpu_us_per_wake < 5000.0,
                "{cpu_us_per_wake}"
            );
            assert!(rounds > 0);
        } else {
            assert!(
                matches!(status, WakeStatus::Unavailable { .. }),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_thread_whose_peer_stopped_stops_too() {
        let cpu = allowed_cpus().unwrap()[0];
        let (to_sleeper_rx, to_sleeper_tx) = std::io::pipe().unwrap();
        let (_to_waker_rx, to_waker_tx) = std::io::pipe().unwrap();
        // The waker is gone: its end of the sleeper's pipe is closed.
        drop(to_sleeper_tx);
        let stopped = std::thread::spawn(move || sleeper(cpu, to_sleeper_rx, to_waker_tx))
            .join()
            .unwrap();
        assert!(matches!(stopped, Err(Stop::PeerGone)), "{stopped:?}");
    }

    #[test]
    fn status_serializes_with_a_tag() {
        let json = serde_json::to_value(WakeStatus::Measured {
            cpu_us_per_wake: 24.5,
            rounds: 400,
        })
        .unwrap();
        assert_eq!(json["status"], "measured");
        assert_eq!(json["rounds"], 400);
        let json = serde_json::to_value(WakeStatus::NotProbed).unwrap();
        assert_eq!(json["status"], "not_probed");
    }
}
