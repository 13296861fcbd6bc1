#!/usr/bin/env bash
# Soak test of one edge (embedded store) under mixed good and hostile clients. Not part of the
# default test run. One command:
#
#   scripts/soak.sh [--conns 10000] [--secs 600] [--shards 2] [--out soak.json]
#
# Starts iris-edge (IRIS_EDGE_BIN, else target/release/iris-edge, else target/debug/iris-edge)
# on free loopback ports with a fresh data directory, then opens --conns connections for
# --secs seconds:
#   60 % good pairs that send each other (and now and then a slow reader) a numbered message
#        every 2-8 s, read and ack everything;
#   10 % slow readers that log in and never read;
#    8 % typing flooders (2,000 TYPING frames under a 200-byte name every 5 s);
#    7 % prekey flooders (5,000 FETCH_PREKEYS of an 8 KiB bundle every 5 s, never reading);
#    7 % random-byte senders (a few hundred random bytes, then reconnect);
#    8 % half-open clients (log in, write half a frame, go silent; reconnect when closed).
# Every 10 s it prints the edge's RSS and its disconnect counters; at the end every user that
# was sent a message logs in again and reads its backlog: every message a good client wrote
# on a healthy connection must arrive (at least once). Prints a JSON summary (and writes it to
# --out); exits 1 if any message was lost, a good client was disconnected, or the edge died.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=10000 secs=600 shards=2 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--conns N] [--secs S] [--shards N] [--out FILE]" >&2; exit 2 ;;
  esac
done
bin=${IRIS_EDGE_BIN:-}
if [ -z "$bin" ]; then
  for b in target/release/iris-edge target/debug/iris-edge; do
    if [ -x "$b" ]; then bin=$b; break; fi
  done
fi
[ -n "$bin" ] || { echo "no iris-edge binary: cargo build -p iris-edge (or set IRIS_EDGE_BIN)" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
dir=$(mktemp -d /tmp/iris-soak.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir "$dir/data" --shards "$shards" \
  >"$dir/stdout" 2>"$dir/stderr" &
pid=$!
for _ in $(seq 200); do
  grep -q "iris-edge listening" "$dir/stdout" 2>/dev/null && break
  sleep 0.1
done
line=$(grep "iris-edge listening" "$dir/stdout") || { echo "iris-edge did not start:" >&2; tail -20 "$dir/stderr" >&2; exit 1; }
client=${line#*client=}; client=${client%% *}
admin=${line#*admin=}; admin=${admin%% *}
echo "soak: $bin pid $pid client $client admin $admin, $conns connections for $secs s, $shards shards"
python3 - "$pid" "$client" "$admin" "$conns" "$secs" "${out:-}" <<'PY'
import asyncio, json, os, random, socket, struct, sys, time, urllib.request

pid, client, admin, conns, secs, out = sys.argv[1:7]
pid, conns, secs = int(pid), int(conns), int(secs)
host, port = client.rsplit(":", 1); port = int(port)
T0 = time.time()
stop = False
sending = True       # good clients send until this turns false (10 s before they close)
lost_examples = []
sent = {}            # recipient -> set of payloads written on a healthy connection
received = {}        # good user -> set of payloads it read (and acked) while running
good_dropped = [0]   # good connections the server closed
errors = {}

def rss_mib():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) / 1024
    return 0.0

def metrics():
    t = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    m = {}
    for l in t.splitlines():
        if l and not l.startswith("#") and "{" not in l:
            k, v = l.split()
            m[k] = float(v)
    return m

def frame_login(u): return b"\x01" + u
def frame_send(t, m): return b"\x02" + struct.pack(">H", len(t)) + t + struct.pack(">H", len(m)) + m
def frame_ack(i): return b"\x03" + i
def frame_typing(t): return b"\x70" + struct.pack(">H", len(t)) + t
def frame_fetch(u): return b"\x21" + struct.pack(">H", len(u)) + u

def parse(buf):
    """(frames, rest): frames are (op, id, payload) for 0x10 and (op, None, None) otherwise."""
    out, p = [], 0
    while p < len(buf):
        op = buf[p]; need = None
        if op == 0x03: need = 9
        elif op == 0x10 and len(buf) >= p + 3:
            il = struct.unpack_from(">H", buf, p + 1)[0]
            if len(buf) >= p + 3 + il + 4:
                ml = struct.unpack_from(">I", buf, p + 3 + il)[0]; need = 3 + il + 4 + ml
        elif op in (0x06,) and len(buf) >= p + 3: need = 3 + struct.unpack_from(">H", buf, p + 1)[0] + 9
        elif op == 0x72 and len(buf) >= p + 3: need = 3 + struct.unpack_from(">H", buf, p + 1)[0] + 1
        elif op == 0x75 and len(buf) >= p + 3:
            il = struct.unpack_from(">H", buf, p + 1)[0]
            if len(buf) >= p + 5 + il: need = 5 + il + struct.unpack_from(">H", buf, p + 3 + il)[0] + 8
        elif op == 0xFE and len(buf) >= p + 3: need = 3 + struct.unpack_from(">H", buf, p + 1)[0]
        elif op == 0xFF: need = 5
        elif op == 0x22 and len(buf) >= p + 5: need = 5 + struct.unpack_from(">I", buf, p + 1)[0]
        elif op not in (0x03, 0x10, 0x06, 0x72, 0x75, 0xFE, 0xFF, 0x22):
            raise ValueError(f"unexpected byte {op:#x}")
        if need is None or len(buf) < p + need: break
        f = buf[p:p + need]
        if op == 0x10:
            il = struct.unpack_from(">H", f, 1)[0]
            out.append((op, f[3:3 + il], f[3 + il + 4:]))
        else:
            out.append((op, None, f))
        p += need
    return out, buf[p:]

async def connect(rcvbuf=None):
    s = socket.socket(); s.setblocking(False)
    if rcvbuf: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await asyncio.get_running_loop().sock_connect(s, (host, port))
    return await asyncio.open_connection(sock=s)

async def login(name, rcvbuf=None):
    r, w = await connect(rcvbuf)
    w.write(frame_login(name)); await w.drain()
    got = await asyncio.wait_for(r.readexactly(9), 30)
    assert got == b"\x03LOGIN_OK", got
    return r, w

NGOOD = int(conns * 0.60) & ~1
NSLOW = int(conns * 0.10)
NTYPE = int(conns * 0.08)
NPK = int(conns * 0.07)
NRAND = int(conns * 0.07)
NHALF = conns - NGOOD - NSLOW - NTYPE - NPK - NRAND
good_names = [f"soak-g{i}".encode() for i in range(NGOOD)]
slow_names = [f"soak-s{i}".encode() for i in range(NSLOW)]

async def good(i):
    me = good_names[i]; partner = good_names[i ^ 1]; seq = 0
    while not stop:
        try:
            r, w = await login(me)
        except Exception as e:
            errors["good_login"] = errors.get("good_login", 0) + 1; await asyncio.sleep(1); continue
        buf = b""
        async def reader():
            nonlocal buf
            while True:
                data = await r.read(65536)
                if not data: raise ConnectionError("closed by server")
                frames, buf = parse(buf + data)
                mine = received.setdefault(me, set())
                for f in frames:
                    if f[0] == 0x10: mine.add(f[2])
                acks = b"".join(frame_ack(f[1]) for f in frames if f[0] == 0x10)
                if acks: w.write(acks)
        rt = asyncio.ensure_future(reader())
        try:
            while not stop:
                await asyncio.wait([rt], timeout=random.uniform(2, 8))
                if rt.done(): rt.result()
                if not sending:
                    continue
                to = partner if (seq % 4 or not slow_names) else random.choice(slow_names)
                payload = b"%s:%d" % (me, seq); seq += 1
                w.write(frame_send(to, payload)); await w.drain()
                sent.setdefault(to, set()).add(payload)
        except Exception:
            good_dropped[0] += 1
        finally:
            rt.cancel(); w.close()

async def slow(i):
    try:
        r, w = await login(slow_names[i], rcvbuf=4096)
        while not stop: await asyncio.sleep(1)
        w.close()
    except Exception:
        errors["slow"] = errors.get("slow", 0) + 1

async def drain_forever(r):
    while await r.read(65536): pass

async def typer(i):
    name = (b"soak-t%d-" % i).ljust(200, b"x")
    while not stop:
        try:
            r, w = await login(name)
            d = asyncio.ensure_future(drain_forever(r))
            while not stop and not d.done():
                w.write(frame_typing(random.choice(good_names)) * 2000); await w.drain()
                await asyncio.sleep(5)
            d.cancel(); w.close()
        except Exception:
            await asyncio.sleep(1)

async def prekey(i):
    while not stop:
        try:
            r, w = await login(b"soak-p%d" % i, rcvbuf=4096)
            while not stop:
                w.write(frame_fetch(b"soak-bundle") * 5000); await w.drain()
                await asyncio.sleep(5)
            w.close()
        except Exception:
            await asyncio.sleep(1)

async def randbytes(i):
    while not stop:
        try:
            r, w = await connect()
            w.write(os.urandom(random.randint(100, 2000))); await w.drain()
            try: await asyncio.wait_for(drain_forever(r), 2)
            except asyncio.TimeoutError: pass
            w.close()
        except Exception:
            pass
        await asyncio.sleep(1)

async def halfopen(i):
    while not stop:
        try:
            r, w = await login(b"soak-h%d" % i)
            w.write(b"\x02\x00\x05"); await w.drain()
            await drain_forever(r)   # until the idle timeout closes it
            w.close()
        except Exception:
            await asyncio.sleep(1)

async def sampler(samples):
    while not stop:
        m = metrics()
        s = {"t": round(time.time() - T0), "rss_mib": round(rss_mib(), 1),
             "connections_open": m.get("iris_edge_connections_open"),
             "slow_consumer": m.get("iris_edge_slow_consumer_disconnects_total"),
             "idle_timeouts": m.get("iris_edge_idle_timeouts_total"),
             "protocol_errors": m.get("iris_edge_protocol_errors_total"),
             "error_limit": m.get("iris_edge_error_limit_disconnects_total"),
             "unknown_opcodes": m.get("iris_edge_unknown_opcodes_total"),
             "typing_dropped": m.get("iris_edge_typing_dropped_total"),
             "reply_backpressure": m.get("iris_edge_reply_backpressure_total"),
             "accepted": m.get("iris_edge_messages_accepted_total")}
        samples.append(s); print("soak:", json.dumps(s), flush=True)
        await asyncio.sleep(10)

async def verify(name, sem):
    async with sem:
        want = sent.get(name, set()); got = set(received.get(name, ()))
        r, w = await login(name)
        buf = b""
        while True:
            try: data = await asyncio.wait_for(r.read(65536), 3)
            except asyncio.TimeoutError: break
            if not data: break
            frames, buf = parse(buf + data)
            for op, mid, payload in frames:
                if op == 0x10:
                    got.add(payload); w.write(frame_ack(mid))
        w.close()
        missing = want - got
        for m in list(missing)[:3]:
            if len(lost_examples) < 20:
                lost_examples.append((name.decode(), m.decode(errors="replace")))
        return len(missing)

async def main():
    global stop
    # The bundle the prekey flooders fetch.
    r, w = await login(b"soak-bundle")
    cb = b"\xa1\x61k\x59\x1f\x40" + b"\x07" * 8000
    w.write(b"\x20" + struct.pack(">I", len(cb)) + cb); await w.drain(); w.close()
    samples = []
    tasks = [asyncio.ensure_future(sampler(samples))]
    for i in range(NSLOW): tasks.append(asyncio.ensure_future(slow(i)))
    await asyncio.sleep(1)
    for i in range(NGOOD): tasks.append(asyncio.ensure_future(good(i)))
    for i in range(NTYPE): tasks.append(asyncio.ensure_future(typer(i)))
    for i in range(NPK): tasks.append(asyncio.ensure_future(prekey(i)))
    for i in range(NRAND): tasks.append(asyncio.ensure_future(randbytes(i)))
    for i in range(NHALF): tasks.append(asyncio.ensure_future(halfopen(i)))
    global sending
    await asyncio.sleep(secs)
    # Quiesce: good clients stop sending and keep reading and acking for 10 s, so what they
    # wrote last reached the edge before they close.
    sending = False
    await asyncio.sleep(10)
    stop = True
    await asyncio.sleep(10)
    for t in tasks: t.cancel()
    await asyncio.sleep(3)
    sem = asyncio.Semaphore(100)
    names = list(sent)
    lost = sum(await asyncio.gather(*(verify(n, sem) for n in names)))
    total = sum(len(v) for v in sent.values())
    alive = os.path.exists(f"/proc/{pid}")
    summary = {"connections": conns, "seconds": secs,
               "mix": {"good": NGOOD, "slow": NSLOW, "typing": NTYPE, "prekey": NPK,
                       "random": NRAND, "half_open": NHALF},
               "messages_sent": total, "recipients_checked": len(names), "messages_lost": lost,
               "lost_examples": lost_examples,
               "good_clients_disconnected": good_dropped[0], "client_errors": errors,
               "edge_alive": alive,
               "rss_mib_max": max(s["rss_mib"] for s in samples),
               "rss_mib_last": samples[-1]["rss_mib"], "samples": samples}
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if out:
        json.dump(summary, open(out, "w"), indent=1)
    sys.exit(0 if lost == 0 and alive and good_dropped[0] == 0 else 1)

asyncio.run(main())
PY
