//! A bad bus frame is counted every time and logged once per kind.
//!
//! In its own test binary on purpose: `tracing` caches, per log call site and for the whole
//! process, whether any subscriber wants it. Tests on other threads that hit the same call sites
//! without a subscriber can leave that cache at "never" while this test installs its own, and
//! the expected lines go missing. Alone in its process, the test sees every line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use iris_bus::{decode_counted, encode, BusFrame, Deliver, FrameCounts, FrameStats};

/// A `tracing` writer that keeps everything written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn bad_frames_are_counted_and_logged_once_per_kind() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let stats = FrameStats::new();
    tracing::subscriber::with_default(subscriber, || {
        let good = encode(&BusFrame::Deliver(Deliver {
            id: 0x0102_0304_0506_0708,
            recipient: b"bob".to_vec(),
            sender: b"alice".to_vec(),
            payload: vec![0xab; 64],
            origin: "eu-west".into(),
            kind: 0,
            confirm: None,
        }))
        .unwrap();
        let mut future = good.clone();
        future[0] = 9;
        let truncated = &good[..good.len() - 3];
        for _ in 0..3 {
            assert!(decode_counted(&stats, &good).is_ok());
            assert!(decode_counted(&stats, &future).is_err());
            assert!(decode_counted(&stats, truncated).is_err());
            assert!(decode_counted(&stats, &[]).is_err());
        }
    });
    assert_eq!(
        stats.counts(),
        FrameCounts {
            ok: 3,
            unknown_version: 3,
            invalid: 6,
        }
    );
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    assert_eq!(log.matches("unknown bus frame version").count(), 1, "{log}");
    assert!(log.contains("version=9"), "{log}");
    assert_eq!(
        log.matches("invalid bus frame, frame skipped").count(),
        1,
        "{log}"
    );
}
