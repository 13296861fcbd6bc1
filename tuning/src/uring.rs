//! Live io_uring probe: can this process set up a ring, and does the kernel support every
//! opcode the edge's glommio executors submit?
//!
//! Uses the `io-uring` crate: set up a tiny ring, register a probe (`IORING_REGISTER_PROBE`,
//! Linux 5.6+) and test each opcode. glommio 0.9 exits the process when one of these is missing,
//! so a miss is critical. Only the live root is probed; a fixture tree reports "not probed".

use io_uring::{opcode, IoUring, Probe};
use serde::Serialize;

/// The opcodes glommio 0.9 requires at executor start (its `GLOMMIO_URING_OPS` list) plus
/// `AsyncCancel`, which it submits to cancel in-flight operations.
pub const EDGE_OPCODES: &[(&str, u8)] = &[
    ("NOP", opcode::Nop::CODE),
    ("READV", opcode::Readv::CODE),
    ("WRITEV", opcode::Writev::CODE),
    ("FSYNC", opcode::Fsync::CODE),
    ("READ_FIXED", opcode::ReadFixed::CODE),
    ("WRITE_FIXED", opcode::WriteFixed::CODE),
    ("POLL_ADD", opcode::PollAdd::CODE),
    ("POLL_REMOVE", opcode::PollRemove::CODE),
    ("SENDMSG", opcode::SendMsg::CODE),
    ("RECVMSG", opcode::RecvMsg::CODE),
    ("TIMEOUT", opcode::Timeout::CODE),
    ("TIMEOUT_REMOVE", opcode::TimeoutRemove::CODE),
    ("ACCEPT", opcode::Accept::CODE),
    ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
    ("LINK_TIMEOUT", opcode::LinkTimeout::CODE),
    ("CONNECT", opcode::Connect::CODE),
    ("FALLOCATE", opcode::Fallocate::CODE),
    ("OPENAT", opcode::OpenAt::CODE),
    ("CLOSE", opcode::Close::CODE),
    ("STATX", opcode::Statx::CODE),
    ("READ", opcode::Read::CODE),
    ("WRITE", opcode::Write::CODE),
    ("SEND", opcode::Send::CODE),
    ("RECV", opcode::Recv::CODE),
];

/// What we know about io_uring on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum UringStatus {
    /// Not probed (fixture tree, or probing switched off).
    NotProbed,
    /// `io_uring_setup` failed.
    SetupFailed { errno: Option<i32>, message: String },
    /// A ring was set up, but the opcode probe could not be registered (kernel before 5.6).
    ProbeFailed { message: String },
    /// A ring was set up and the opcodes probed.
    Probed { missing: Vec<String>, total: usize },
}

/// Probes io_uring in this process. Costs one 2-entry ring (a few KiB of locked memory, released
/// when the probe returns).
pub fn probe() -> UringStatus {
    let ring = match IoUring::new(2) {
        Ok(ring) => ring,
        Err(e) => {
            return UringStatus::SetupFailed {
                errno: e.raw_os_error(),
                message: e.to_string(),
            }
        }
    };
    let mut probe = Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return UringStatus::ProbeFailed {
            message: e.to_string(),
        };
    }
    let missing = EDGE_OPCODES
        .iter()
        .filter(|(_, code)| !probe.is_supported(*code))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    UringStatus::Probed {
        missing,
        total: EDGE_OPCODES.len(),
    }
}
