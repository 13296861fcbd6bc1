//! Encoders: [`encode_client`] and [`encode_server`] append one frame to a caller's buffer.
//!
//! Appending lets a connection batch many frames into one write. The `len` field is written
//! last, from the bytes actually appended. Encoders never panic and always produce a frame the
//! length field describes exactly; callers keep fields within the protocol's limits (the
//! decoders refuse what is out of range). A field longer than its length field can express is
//! cut to fit: a *str* to 65535 bytes, a *blob* to 2³²−1 bytes, an id list to 65535 ids; a
//! non-ASCII byte of an ERROR reason is written as `?`.

use super::frame::{ClientFrame, ServerFrame, VERSION};

/// Appends the wire form of a client frame to `out`.
pub fn encode_client(frame: &ClientFrame, out: &mut Vec<u8>) {
    let start = begin(out, frame.ty());
    match frame {
        ClientFrame::Hello {
            client_name,
            client_version,
            token,
            resume_after,
        } => {
            out.push(VERSION);
            put_str(out, client_name);
            put_str(out, client_version);
            put_str(out, token);
            put_u64(out, *resume_after);
        }
        ClientFrame::Send {
            client_msg_id,
            recipient,
            kind,
            payload,
        } => {
            put_u64(out, *client_msg_id);
            put_str(out, recipient);
            out.push(kind.to_u8());
            put_blob(out, payload);
        }
        ClientFrame::Ack { ids } => put_ids(out, ids),
        ClientFrame::Receipt { kind, sender, ids } => {
            out.push(kind.to_u8());
            put_str(out, sender);
            put_ids(out, ids);
        }
        ClientFrame::Typing { target, typing } => {
            put_str(out, target);
            out.push(u8::from(*typing));
        }
        ClientFrame::StatusQuery { user } | ClientFrame::PrekeyFetch { user } => put_str(out, user),
        ClientFrame::Ping { nonce } | ClientFrame::Pong { nonce } => put_u64(out, *nonce),
        ClientFrame::PrekeyUpload { bundle } => put_blob(out, bundle),
    }
    finish(out, start);
}

/// Appends the wire form of a server frame to `out`.
pub fn encode_server(frame: &ServerFrame, out: &mut Vec<u8>) {
    let start = begin(out, frame.ty());
    match frame {
        ServerFrame::HelloOk {
            version,
            max_frame_bytes,
            ping_interval_ms,
            send_rate_per_sec,
            send_burst,
            session_id,
            server_time_unix_ms,
        } => {
            out.push(*version);
            put_u32(out, *max_frame_bytes);
            put_u32(out, *ping_interval_ms);
            put_u32(out, *send_rate_per_sec);
            put_u32(out, *send_burst);
            put_u64(out, *session_id);
            put_u64(out, *server_time_unix_ms);
        }
        ServerFrame::SendAck {
            client_msg_id,
            server_id,
            server_time_unix_ms,
        } => {
            put_u64(out, *client_msg_id);
            put_u64(out, *server_id);
            put_u64(out, *server_time_unix_ms);
        }
        ServerFrame::Deliver {
            server_id,
            sender,
            server_time_unix_ms,
            kind,
            payload,
        } => {
            put_u64(out, *server_id);
            put_str(out, sender);
            put_u64(out, *server_time_unix_ms);
            out.push(kind.to_u8());
            put_blob(out, payload);
        }
        ServerFrame::Receipt {
            kind,
            reader,
            unix_ms,
            ids,
        } => {
            out.push(kind.to_u8());
            put_str(out, reader);
            put_u64(out, *unix_ms);
            put_ids(out, ids);
        }
        ServerFrame::Typing { sender, typing } => {
            put_str(out, sender);
            out.push(u8::from(*typing));
        }
        ServerFrame::Status {
            user,
            online,
            last_seen_unix_secs,
        } => {
            put_str(out, user);
            out.push(u8::from(*online));
            put_u64(out, *last_seen_unix_secs);
        }
        ServerFrame::Ping { nonce } | ServerFrame::Pong { nonce } => put_u64(out, *nonce),
        ServerFrame::Prekeys { user, bundle } => {
            put_str(out, user);
            put_blob(out, bundle);
        }
        ServerFrame::RateLimited {
            what,
            retry_after_ms,
            reference,
        } => {
            out.push(what.to_u8());
            put_u32(out, *retry_after_ms);
            put_u64(out, *reference);
        }
        ServerFrame::Error {
            code,
            reason,
            reference,
        } => {
            put_u16(out, *code);
            let ascii: Vec<u8> = reason
                .bytes()
                .map(|b| if b.is_ascii() { b } else { b'?' })
                .collect();
            put_str(out, &ascii);
            put_u64(out, *reference);
        }
    }
    finish(out, start);
}

/// Reserves the length field, writes the type byte; returns where the frame starts.
fn begin(out: &mut Vec<u8>, ty: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
    start
}

/// Writes the length field of the frame that starts at `start`.
fn finish(out: &mut [u8], start: usize) {
    let len = out.len().saturating_sub(start + 4);
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    if let Some(field) = out.get_mut(start..start + 4) {
        field.copy_from_slice(&len);
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// `u16 len | bytes`, cut to 65535 bytes.
fn put_str(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(usize::from(u16::MAX));
    put_u16(out, n as u16);
    out.extend_from_slice(&b[..n]);
}

/// `u32 len | bytes`, cut to 2³²−1 bytes.
fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(u32::MAX as usize);
    put_u32(out, n as u32);
    out.extend_from_slice(&b[..n]);
}

/// `u16 count | count × u64`, cut to 65535 ids.
fn put_ids(out: &mut Vec<u8>, ids: &[u64]) {
    let n = ids.len().min(usize::from(u16::MAX));
    put_u16(out, n as u16);
    for id in &ids[..n] {
        put_u64(out, *id);
    }
}
