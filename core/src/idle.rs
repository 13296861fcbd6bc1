//! A hook run on a worker thread once per idle period.
//!
//! The edge hands its allocator's collection (mimalloc's `mi_collect`) to the threads of the
//! core library that it runs: the embedded core thread ([`crate::embedded`]), and in a cluster
//! the bus bridge ([`crate::remote`]) and the session writer ([`crate::sessions`]). mimalloc
//! gives the pages a thread freed back to the kernel only when that thread allocates or frees
//! again, so a thread that goes quiet after a burst (a login storm, a drain) would keep the
//! burst's memory resident. [`IdleHook::note`], called once per turn of the thread's loop, runs
//! the hook once the thread has done nothing for [`IDLE_HOOK_AFTER`], and then not again until
//! it has been busy. It is never called per message.

use std::time::{Duration, Instant};

/// How long a thread is idle before its hook runs.
pub const IDLE_HOOK_AFTER: Duration = Duration::from_secs(1);

/// Runs an optional hook once per idle period of the thread that owns it.
#[derive(Debug)]
pub struct IdleHook {
    hook: Option<fn()>,
    /// The last turn that did something.
    busy_at: Instant,
    /// The hook ran since `busy_at` (or nothing happened yet: a thread starts idle and
    /// has nothing to give back).
    hooked: bool,
}

impl IdleHook {
    /// A hook that runs after the thread's first busy period has ended.
    pub fn new(hook: Option<fn()>) -> Self {
        Self {
            hook,
            busy_at: Instant::now(),
            hooked: true,
        }
    }

    /// One turn of the thread's loop, `busy` if it did something; runs the hook when the
    /// thread has been idle for [`IDLE_HOOK_AFTER`] since it was last busy, once.
    pub fn note(&mut self, busy: bool, now: Instant) {
        if busy {
            self.busy_at = now;
            self.hooked = false;
        } else if !self.hooked && now.duration_since(self.busy_at) >= IDLE_HOOK_AFTER {
            self.hooked = true;
            if let Some(hook) = self.hook {
                hook();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RUNS: AtomicUsize = AtomicUsize::new(0);

    fn count() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    /// Not while starting idle, not while busy, once after each busy period's idle second.
    #[test]
    fn runs_once_per_idle_period() {
        let runs = || RUNS.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let mut h = IdleHook::new(Some(count));
        h.note(false, t0 + IDLE_HOOK_AFTER * 5);
        assert_eq!(
            runs(),
            0,
            "a thread that never worked has nothing to give back"
        );
        h.note(true, t0 + IDLE_HOOK_AFTER);
        h.note(false, t0 + IDLE_HOOK_AFTER + IDLE_HOOK_AFTER / 2);
        assert_eq!(runs(), 0, "idle for less than IDLE_HOOK_AFTER");
        h.note(false, t0 + IDLE_HOOK_AFTER * 2);
        assert_eq!(runs(), 1);
        h.note(false, t0 + IDLE_HOOK_AFTER * 9);
        assert_eq!(runs(), 1, "once per idle period");
        h.note(true, t0 + IDLE_HOOK_AFTER * 10);
        h.note(false, t0 + IDLE_HOOK_AFTER * 11);
        assert_eq!(runs(), 2, "again after the next busy period");
        let mut none = IdleHook::new(None);
        none.note(true, t0);
        none.note(false, t0 + IDLE_HOOK_AFTER * 2);
        assert_eq!(runs(), 2);
    }
}
