// iris.js: a tiny Iris protocol v2 codec and client over the browser WebSocket
// (docs/PROTOCOL-v2.md). No dependencies, no build step: a plain ES module.
//
// Frames are `u32 len | u8 type | body`, all integers unsigned big-endian; over WebSocket each
// frame is exactly one binary message. u64 values (ids, times, nonces) are BigInt.

export const HELLO = 0x01;
export const SEND = 0x02;
export const ACK = 0x03;
export const RECEIPT = 0x04;
export const TYPING = 0x05;
export const STATUS_QUERY = 0x06;
export const PING = 0x07;
export const PONG = 0x08;

export const S_HELLO_OK = 0x81;
export const S_SEND_ACK = 0x82;
export const S_DELIVER = 0x83;
export const S_RECEIPT = 0x84;
export const S_TYPING = 0x85;
export const S_STATUS = 0x86;
export const S_PING = 0x87;
export const S_PONG = 0x88;
export const S_PREKEYS = 0x89;
export const S_RATE_LIMITED = 0x8a;
export const S_ERROR = 0x8b;

/** RECEIPT kinds. */
export const RECEIPT_DELIVERED = 1;
export const RECEIPT_READ = 2;

/** Largest frame before HELLO_OK (the HELLO), and the default announced after it. */
export const MAX_HELLO_FRAME_BYTES = 4096;
export const MAX_USER_BYTES = 256;
export const MAX_IDS = 1024;

const utf8 = new TextEncoder();
const utf8d = new TextDecoder("utf-8", { fatal: false });

/** A frame the codec cannot encode or decode. `code` is the protocol's reason name. */
export class WireError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

/** Bytes of a string (UTF-8) or of a Uint8Array / ArrayBuffer as is. */
export function bytes(x) {
  if (typeof x === "string") return utf8.encode(x);
  if (x instanceof Uint8Array) return x;
  if (x instanceof ArrayBuffer) return new Uint8Array(x);
  throw new TypeError("expected a string or bytes");
}

/** Text of bytes (UTF-8, invalid sequences replaced). */
export function text(b) {
  return utf8d.decode(b);
}

function user(x, what) {
  const b = bytes(x);
  if (b.length < 1 || b.length > MAX_USER_BYTES) {
    throw new WireError("bad_user", `${what} must be 1 to ${MAX_USER_BYTES} bytes`);
  }
  return b;
}

function idList(ids) {
  const list = Array.from(ids, (i) => BigInt(i));
  if (list.length < 1 || list.length > MAX_IDS) {
    throw new WireError("bad_id_count", `1 to ${MAX_IDS} ids, not ${list.length}`);
  }
  return list;
}

/** Builds one frame: `u32 len | u8 type | body`. */
class Writer {
  constructor(type) {
    this.buf = new Uint8Array(64);
    this.view = new DataView(this.buf.buffer);
    this.n = 4;
    this.u8(type);
  }
  room(k) {
    if (this.n + k <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.n + k) size *= 2;
    const b = new Uint8Array(size);
    b.set(this.buf.subarray(0, this.n));
    this.buf = b;
    this.view = new DataView(b.buffer);
  }
  u8(v) { this.room(1); this.view.setUint8(this.n, v); this.n += 1; return this; }
  u16(v) { this.room(2); this.view.setUint16(this.n, v); this.n += 2; return this; }
  u32(v) { this.room(4); this.view.setUint32(this.n, v); this.n += 4; return this; }
  u64(v) { this.room(8); this.view.setBigUint64(this.n, BigInt(v)); this.n += 8; return this; }
  raw(b) { this.room(b.length); this.buf.set(b, this.n); this.n += b.length; return this; }
  str(b) {
    if (b.length > 0xffff) throw new WireError("bad_frame", "str over 65535 bytes");
    return this.u16(b.length).raw(b);
  }
  blob(b) { return this.u32(b.length).raw(b); }
  ids(list) { this.u16(list.length); for (const i of list) this.u64(i); return this; }
  finish() {
    this.view.setUint32(0, this.n - 4);
    return this.buf.slice(0, this.n);
  }
}

// ---------------------------------------------------------------------------------------------
// Client frames (encoders): each returns a Uint8Array holding one whole frame.
// ---------------------------------------------------------------------------------------------

/** HELLO: `u8 version (2) | str client_name | str client_version | str token | u64 resume_after`. */
export function encodeHello({ token, clientName = "iris-web", clientVersion = "0.1", resumeAfter = 0n }) {
  const t = bytes(token);
  if (t.length < 1) throw new WireError("bad_token", "empty token");
  const f = new Writer(HELLO)
    .u8(2)
    .str(bytes(clientName))
    .str(bytes(clientVersion))
    .str(t)
    .u64(resumeAfter)
    .finish();
  if (f.length - 4 > MAX_HELLO_FRAME_BYTES) {
    throw new WireError("frame_too_large", `HELLO over ${MAX_HELLO_FRAME_BYTES} bytes`);
  }
  return f;
}

/** SEND: `u64 client_msg_id | str recipient | u8 kind | blob payload`. */
export function encodeSend(clientMsgId, recipient, kind, payload) {
  return new Writer(SEND)
    .u64(clientMsgId)
    .str(user(recipient, "recipient"))
    .u8(kind)
    .blob(bytes(payload))
    .finish();
}

/** ACK: `u16 count | count × u64 server_id`. */
export function encodeAck(ids) {
  return new Writer(ACK).ids(idList(ids)).finish();
}

/** RECEIPT: `u8 kind | str original_sender | u16 count | count × u64 server_id`. */
export function encodeReceipt(kind, originalSender, ids) {
  return new Writer(RECEIPT)
    .u8(kind)
    .str(user(originalSender, "original sender"))
    .ids(idList(ids))
    .finish();
}

/** TYPING: `str target | u8 state` (1 typing, 0 stopped). */
export function encodeTyping(target, typing) {
  return new Writer(TYPING).str(user(target, "target")).u8(typing ? 1 : 0).finish();
}

/** STATUS_QUERY: `str user`. */
export function encodeStatusQuery(who) {
  return new Writer(STATUS_QUERY).str(user(who, "user")).finish();
}

/** PING / PONG: `u64 nonce`. */
export function encodePing(nonce) {
  return new Writer(PING).u64(nonce).finish();
}
export function encodePong(nonce) {
  return new Writer(PONG).u64(nonce).finish();
}

// ---------------------------------------------------------------------------------------------
// Server frames (decoder)
// ---------------------------------------------------------------------------------------------

class Reader {
  constructor(u8) {
    this.b = u8;
    this.v = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
    this.n = 0;
  }
  need(k) {
    if (this.n + k > this.b.length) throw new WireError("bad_frame", "field past the end of the frame");
  }
  u8() { this.need(1); const x = this.v.getUint8(this.n); this.n += 1; return x; }
  u16() { this.need(2); const x = this.v.getUint16(this.n); this.n += 2; return x; }
  u32() { this.need(4); const x = this.v.getUint32(this.n); this.n += 4; return x; }
  u64() { this.need(8); const x = this.v.getBigUint64(this.n); this.n += 8; return x; }
  raw(k) { this.need(k); const x = this.b.slice(this.n, this.n + k); this.n += k; return x; }
  str() { return this.raw(this.u16()); }
  blob() { return this.raw(this.u32()); }
  ids() {
    const count = this.u16();
    if (count < 1 || count > MAX_IDS) throw new WireError("bad_id_count", `${count} ids`);
    const out = [];
    for (let i = 0; i < count; i++) out.push(this.u64());
    return out;
  }
  end() {
    if (this.n !== this.b.length) throw new WireError("bad_frame", "bytes left over after the body");
  }
}

/**
 * Decodes one whole server frame (one WebSocket message). Returns an object with `type` and
 * `name` and the body's fields (byte strings as Uint8Array, u64 as BigInt); a type this codec
 * does not know decodes to `{ type, name: "unknown", body }`. Throws WireError on a bad frame.
 */
export function decodeServer(data) {
  const b = bytes(data);
  if (b.length < 5) throw new WireError("bad_frame", `${b.length}-byte frame`);
  const len = new DataView(b.buffer, b.byteOffset, 4).getUint32(0);
  if (len !== b.length - 4) {
    throw new WireError("bad_frame", `length field ${len} in a ${b.length}-byte message`);
  }
  const type = b[4];
  const r = new Reader(b.subarray(5));
  let f;
  switch (type) {
    case S_HELLO_OK:
      f = {
        name: "hello_ok",
        version: r.u8(),
        maxFrameBytes: r.u32(),
        pingIntervalMs: r.u32(),
        sendRatePerSec: r.u32(),
        sendBurst: r.u32(),
        sessionId: r.u64(),
        serverTimeUnixMs: r.u64(),
      };
      break;
    case S_SEND_ACK:
      f = { name: "send_ack", clientMsgId: r.u64(), serverId: r.u64(), serverTimeUnixMs: r.u64() };
      break;
    case S_DELIVER:
      f = {
        name: "deliver",
        serverId: r.u64(),
        sender: r.str(),
        serverTimeUnixMs: r.u64(),
        kind: r.u8(),
        payload: r.blob(),
      };
      break;
    case S_RECEIPT:
      f = { name: "receipt", kind: r.u8(), reader: r.str(), unixMs: r.u64(), ids: r.ids() };
      break;
    case S_TYPING: {
      f = { name: "typing", sender: r.str(), state: r.u8() };
      if (f.state > 1) throw new WireError("bad_frame", `typing state ${f.state}`);
      break;
    }
    case S_STATUS:
      f = { name: "status", user: r.str(), online: r.u8() === 1, lastSeen: r.u64() };
      break;
    case S_PING:
      f = { name: "ping", nonce: r.u64() };
      break;
    case S_PONG:
      f = { name: "pong", nonce: r.u64() };
      break;
    case S_PREKEYS:
      f = { name: "prekeys", user: r.str(), bundle: r.blob() };
      break;
    case S_RATE_LIMITED:
      f = { name: "rate_limited", what: r.u8(), retryAfterMs: r.u32(), ref: r.u64() };
      break;
    case S_ERROR:
      f = { name: "error", code: r.u16(), reason: text(r.str()), ref: r.u64() };
      break;
    default:
      return { type, name: "unknown", body: b.slice(5) };
  }
  r.end();
  f.type = type;
  return f;
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

let lastMsgId = 0n;

/**
 * A fresh client_msg_id. It must be unique per sender, across connections and page reloads
 * (a reused id is taken for a resend: acknowledged with the old server id, never delivered),
 * so it is the clock in ms times 4096 plus a counter, never below the previous one.
 */
export function nextClientMsgId() {
  const now = BigInt(Date.now()) * 4096n;
  lastMsgId = now > lastMsgId ? now : lastMsgId + 1n;
  return lastMsgId;
}

/**
 * One v2 session over a WebSocket. Events (CustomEvent, fields in `detail`):
 * `deliver` (a DELIVER, once per server id; `text` added for kind 0), `receipt`, `typing`,
 * `status`, `ack` (a SEND_ACK), `error` (ERROR frame, or a local codec error), `rate_limited`,
 * `close` (`{ code, reason }`).
 *
 * DELIVERs are ACKed automatically once the `deliver` listeners have run. Sends not yet
 * acknowledged when the connection drops are kept and resent with the same client_msg_id by
 * the next `connect()`.
 */
export class IrisClient extends EventTarget {
  constructor({ url, token, clientName = "iris-web", clientVersion = "0.1" }) {
    super();
    this.url = url;
    this.token = token;
    this.clientName = clientName;
    this.clientVersion = clientVersion;
    this.ws = null;
    this.helloOk = null;
    this.pending = new Map(); // client_msg_id (string) -> { id, frame, resolve, reject }
    this.seen = new Set(); // delivered server ids (strings)
    this.resumeAfter = 0n;
    this.toAck = [];
    this.lastRx = 0;
    this.watchdog = null;
  }

  /** Opens the WebSocket and says HELLO; resolves with the HELLO_OK frame. */
  connect() {
    if (this.ws) this.ws.close();
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (e) {
        reject(e);
        return;
      }
      this.ws = ws;
      ws.binaryType = "arraybuffer";
      let helloDone = false;
      ws.onopen = () => {
        ws.send(
          encodeHello({
            token: this.token,
            clientName: this.clientName,
            clientVersion: this.clientVersion,
            resumeAfter: this.resumeAfter,
          }),
        );
        // Pipelined after the HELLO: sends the previous connection did not see acknowledged.
        for (const p of this.pending.values()) ws.send(p.frame);
      };
      ws.onmessage = (ev) => {
        if (ws !== this.ws) return;
        this.lastRx = Date.now();
        if (!(ev.data instanceof ArrayBuffer)) {
          this.emit("error", { code: 0, reason: "text message from the server" });
          return;
        }
        let f;
        try {
          f = decodeServer(ev.data);
        } catch (e) {
          this.emit("error", { code: 0, reason: String(e.message || e) });
          ws.close(1002, "bad frame");
          return;
        }
        if (f.name === "hello_ok") {
          helloDone = true;
          this.helloOk = f;
          this.startWatchdog(f.pingIntervalMs);
          resolve(f);
          return;
        }
        if (!helloDone && (f.name === "error" || f.name === "rate_limited")) {
          reject(new Error(f.name === "error" ? `login refused: ${f.reason}` : "login rate limited"));
        }
        this.handle(f);
      };
      ws.onerror = () => {
        if (!helloDone) reject(new Error(`cannot connect to ${this.url}`));
      };
      ws.onclose = (ev) => {
        if (ws !== this.ws) return;
        this.stopWatchdog();
        if (!helloDone) reject(new Error(`connection closed before HELLO_OK (${ev.code})`));
        this.emit("close", { code: ev.code, reason: ev.reason });
      };
    });
  }

  close() {
    this.stopWatchdog();
    if (this.ws) this.ws.close(1000, "bye");
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.helloOk !== null;
  }

  emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  write(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  /** Keepalive: the connection is dead after 3 ping intervals with nothing received. */
  startWatchdog(intervalMs) {
    this.stopWatchdog();
    if (!intervalMs) return;
    this.lastRx = Date.now();
    this.watchdog = setInterval(() => {
      if (Date.now() - this.lastRx > 3 * intervalMs && this.ws) {
        this.ws.close(4000, "nothing received for 3 ping intervals");
      }
    }, Math.min(intervalMs, 10_000));
  }

  stopWatchdog() {
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  /**
   * Sends `payload` (a string is sent as UTF-8) to `recipient`; returns `{ clientMsgId, acked }`
   * where `acked` resolves with the SEND_ACK (`serverId`, `serverTimeUnixMs`) once the message is
   * durable, or rejects on an ERROR for it. RATE_LIMITED sends are resent after the delay.
   */
  send(recipient, payload, kind = 0) {
    const id = nextClientMsgId();
    const frame = encodeSend(id, recipient, kind, payload);
    let p;
    const acked = new Promise((resolve, reject) => {
      p = { id, frame, resolve, reject };
    });
    this.pending.set(id.toString(), p);
    this.write(frame);
    return { clientMsgId: id, acked };
  }

  ack(ids) {
    this.write(encodeAck(ids));
  }

  receipt(kind, originalSender, ids) {
    this.write(encodeReceipt(kind, originalSender, ids));
  }

  typing(target, on) {
    this.write(encodeTyping(target, on));
  }

  statusQuery(who) {
    this.write(encodeStatusQuery(who));
  }

  handle(f) {
    switch (f.name) {
      case "ping":
        this.write(encodePong(f.nonce));
        break;
      case "send_ack": {
        const key = f.clientMsgId.toString();
        const p = this.pending.get(key);
        this.pending.delete(key);
        this.emit("ack", f);
        if (p) p.resolve(f);
        break;
      }
      case "deliver": {
        const key = f.serverId.toString();
        if (!this.seen.has(key)) {
          this.seen.add(key);
          if (f.kind === 0) f.text = text(f.payload);
          f.senderText = text(f.sender);
          this.emit("deliver", f);
        }
        if (f.serverId > this.resumeAfter) this.resumeAfter = f.serverId;
        this.queueAck(f.serverId);
        break;
      }
      case "receipt":
        f.readerText = text(f.reader);
        this.emit("receipt", f);
        break;
      case "typing":
        f.senderText = text(f.sender);
        this.emit("typing", f);
        break;
      case "status":
        f.userText = text(f.user);
        this.emit("status", f);
        break;
      case "rate_limited": {
        const p = f.what === 1 ? this.pending.get(f.ref.toString()) : undefined;
        if (p) setTimeout(() => this.write(p.frame), Math.max(f.retryAfterMs, 50));
        this.emit("rate_limited", f);
        break;
      }
      case "error": {
        const key = f.ref.toString();
        const p = f.ref !== 0n ? this.pending.get(key) : undefined;
        // 2xxx: the server's fault, the send stays pending and is resent on the next connect.
        if (p && f.code < 2000) {
          this.pending.delete(key);
          p.reject(new Error(`send refused: ${f.reason} (${f.code})`));
        }
        this.emit("error", f);
        break;
      }
      default:
        break; // pong, prekeys, unknown types: nothing to do
    }
  }

  queueAck(id) {
    this.toAck.push(id);
    if (this.toAck.length === 1) {
      queueMicrotask(() => {
        const ids = this.toAck.splice(0, this.toAck.length);
        while (ids.length) this.ack(ids.splice(0, MAX_IDS));
      });
    }
  }
}

/** Hex of bytes, for logs and tests. */
export function hex(b) {
  return Array.from(bytes(b), (x) => x.toString(16).padStart(2, "0")).join("");
}
