#!/usr/bin/env python3
"""Live interop test: a whispeer client written from docs/PROTOCOL.md only, against the real
relay (whispeer-relay) and the real Rust CLI (whispeer).

Starts its own relays (memory store, TCP + WebSocket on port 0, and a `--store none` relay for
the error checks), generates a tree key and an identity with the CLI, and checks, both ways,
that messages sealed by one side are opened by the other with exactly the published values.

Prints one line per check; exits 0 only when every check passed.
No fixed sleeps: every wait reads frames (or process output) until a deadline.
"""
import json
import os
import queue
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cbor2  # noqa: E402
import ed25519 as ed  # noqa: E402
import frames as F  # noqa: E402
import whispeer as w  # noqa: E402

BIN = os.environ.get(
    "WHISPEER_BIN_DIR",
    os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "..", "target")), "debug"),
)
RELAY_BIN = os.path.join(BIN, "whispeer-relay")
CLI_BIN = os.path.join(BIN, "whispeer")

# frame types (§3.2)
HELLO, WELCOME, SUB, UNSUB, SUBOK, PUB, MSG, ACK, PUBACK, ERR, PING, PONG, GAP, CLOSE, REPLAYDONE = range(1, 16)
FNAME = {t: F.SCHEMA[t][0] for t in F.SCHEMA}
# pub_flags / msg_flags (§3.4.4, §3.4.5)
P_RETAIN, P_ACK = 1, 2
M_RETAINED, M_REDELIVERED, M_REPLAYED = 1, 2, 4
# feature bits (§3.4.6)
ALL_FEATURES = 0xFF
FEATURE_NAMES = ["AT_LEAST_ONCE", "EXACTLY_ONCE", "RETAIN", "REPLAY", "DURABLE", "FLOW_CONTROL",
                 "DURABLE_DELETE", "HISTORY_END"]

RESULTS = []
NOTES = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    print("%s  %s%s" % ("PASS" if ok else "FAIL", name, ("  -- " + detail) if detail else ""), flush=True)
    return bool(ok)


def note(text):
    NOTES.append(text)
    print("NOTE  " + text, flush=True)


def now_ms():
    return int(time.time() * 1000)


# ============================================================ transports (§2)
class Closed(Exception):
    pass


class TcpTransport:
    """§2.2: u32be length ‖ frame."""
    name = "tcp"

    def __init__(self, hostport):
        host, port = hostport.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""
        self.max_frame = 4096  # handshake cap until Welcome (§2.3)

    def send(self, frame):
        self.s.sendall(struct.pack(">I", len(frame)) + frame)

    def send_raw(self, data):
        self.s.sendall(data)

    def recv(self, deadline):
        """one frame's bytes, or None at the deadline; Closed at end of stream."""
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if n == 0:
                    raise Closed("zero length prefix")
                if n > 64 * 1024 * 1024:
                    raise Closed("length prefix above the ceiling")
                if len(self.buf) >= 4 + n:
                    fr, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return fr
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                raise Closed("connection reset")
            if not chunk:
                if self.buf:
                    raise Closed("truncated stream")
                raise Closed("end of stream")
            self.buf += chunk

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class WsTransport:
    """§2.1: one binary WebSocket message per frame."""
    name = "ws"

    def __init__(self, hostport):
        import websocket
        self.websocket = websocket
        self.ws = websocket.create_connection("ws://%s/" % hostport, timeout=10)
        self.ws_pings = 0

    def send(self, frame):
        self.ws.send_binary(frame)

    def send_text(self, text):
        self.ws.send(text)

    def recv(self, deadline):
        ws = self.websocket
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.ws.settimeout(left)
            try:
                op, data = self.ws.recv_data(control_frame=True)
            except ws.WebSocketTimeoutException:
                return None
            except (ws.WebSocketConnectionClosedException, ConnectionResetError, OSError) as e:
                raise Closed("websocket closed: %s" % e)
            if op == ws.ABNF.OPCODE_PING:
                self.ws_pings += 1  # websocket-client already answered it with a pong
                continue
            if op == ws.ABNF.OPCODE_PONG:
                continue
            if op == ws.ABNF.OPCODE_CLOSE:
                raise Closed("websocket close frame")
            if op == ws.ABNF.OPCODE_BINARY:
                return data
            raise Closed("unexpected websocket opcode %d" % op)

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


# ============================================================ the crypto side (§4, §5)
class Member:
    """Holds one tree key (whole-tree grant) and an identity; seals and opens envelopes."""

    def __init__(self, tree_key_str, seed=None):
        self.tk = w.TreeKey.parse(tree_key_str)
        self.kr = w.Keyring()
        self.kr.add_tree_key(self.tk, now_ms())
        self.seed = seed or secrets.token_bytes(32)
        self.pk = ed.public_key(self.seed)
        self.wspk = w.wspk(self.pk)
        self.roots = set()

    @property
    def key_id(self):
        return self.tk.key_id()

    def compile_filter(self, flt):
        """§8.4: literal -> T(i, s) (16-byte bstr), '+' -> uint 1, '#' -> uint 2."""
        levels = w.check_topic(flt, is_filter=True)
        out = []
        for i, s in enumerate(levels):
            if s == "+":
                out.append(("uint", 1))
            elif s == "#":
                out.append(("uint", 2))
            else:
                out.append(("bytes", w.token(self.tk.R, i, s)))
        return out

    def topic_key(self, topic):
        return w.derive_topic_key(w.Scope(0), self.tk.S0, topic)

    def _fields(self, topic, value, codec_spec):
        payload = cbor2.dumps(value)
        codec, stored = w.compress(codec_spec, payload)
        return dict(msg_id=secrets.token_bytes(16), ts_ms=now_ms(), content_type=b"application/cbor",
                    codec=codec, pad_scheme=1, payload=stored)

    def _seal(self, topic, body, suite):
        return w.seal(suite=suite, key_id=self.key_id, R=self.tk.R, N=self.tk.N, M=self.topic_key(topic),
                      topic=topic, nonce=secrets.token_bytes(24), body_plain=body)

    def seal(self, topic, value, sign=True, codec_spec="none", suite=1):
        f = self._fields(topic, value, codec_spec)
        if sign:
            m = w.sig_input(self.tk.tree_id, self.tk.epoch, topic, f["msg_id"], f["ts_ms"], f["content_type"],
                            f["codec"], f["pad_scheme"], f["payload"])
            body = w.build_body(1, f["msg_id"], f["ts_ms"], f["content_type"], f["codec"], f["pad_scheme"],
                                f["payload"], sender_pk=self.pk, sig=ed.sign(self.seed, m))
        else:
            body = w.build_body(0, f["msg_id"], f["ts_ms"], f["content_type"], f["codec"], f["pad_scheme"],
                                f["payload"])
        return self._seal(topic, body, suite), f

    def seal_batch(self, items, codec_spec="none", suite=1):
        """§4.14: one Ed25519 signature over the Merkle root of salted leaves."""
        fs, ms, salts = [], [], []
        for topic, value in items:
            f = self._fields(topic, value, codec_spec)
            fs.append(f)
            ms.append(w.sig_input(self.tk.tree_id, self.tk.epoch, topic, f["msg_id"], f["ts_ms"],
                                  f["content_type"], f["codec"], f["pad_scheme"], f["payload"]))
            salts.append(secrets.token_bytes(32))
        leaves = [w.leaf_hash(s, m) for s, m in zip(salts, ms)]
        root = w.mth(leaves)
        n = len(items)
        sig = ed.sign(self.seed, w.batch_signed_bytes(self.tk.tree_id, self.tk.epoch, n, root))
        envs = []
        for i, ((topic, _), f) in enumerate(zip(items, fs)):
            body = w.build_body(2, f["msg_id"], f["ts_ms"], f["content_type"], f["codec"], f["pad_scheme"],
                                f["payload"], sender_pk=self.pk, sig=sig,
                                batch=(n, i, salts[i], w.merkle_path(leaves, i)))
            envs.append(self._seal(topic, body, suite))
        return envs, fs

    def open(self, env, live=True):
        o = w.open_envelope(self.kr, env, now_ms(), live=live, roots_cache=self.roots)
        o.value = cbor2.loads(o.payload) if o.content_type.startswith(b"application/cbor") else o.payload
        return o


def pattern_matches(pattern, key_id, env):
    """§8.4 on the envelope header (client side routing of live Msg frames, §3.3.7)."""
    h = w.parse_envelope(env)
    if h.key_id != key_id:
        return False
    toks = h.tokens
    for i, (kind, v) in enumerate(pattern):
        if kind == "uint" and v == 2:
            return True
        if i >= len(toks):
            return False
        if kind == "bytes" and toks[i] != v:
            return False
    return len(pattern) == len(toks)


# ============================================================ the session (§3.5)
class Client:
    def __init__(self, transport, label):
        self.t = transport
        self.label = label
        self.pending = []  # decoded frames received, not yet consumed
        self.errors = []
        self.gaps = 0
        self.pings_from_relay = 0
        self.closed = None
        self.welcome = None
        self.heartbeat = 15.0
        self.last_sent = time.monotonic()
        self.features = 0

    # ---- sending
    def send(self, ftype, fields):
        fr = F.encode_frame(ftype, fields)
        self.t.send(fr)
        self.last_sent = time.monotonic()
        return fr

    def hello(self, features=ALL_FEATURES, versions=(2,), timeout=10):
        self.send(HELLO, {1: [("uint", v) for v in versions], 2: features, 3: b"pylive/0.1"})
        fr = self.wait(lambda t, f: t in (WELCOME, ERR, CLOSE), timeout)
        if fr is None or fr[0] != WELCOME:
            return fr
        self.welcome = fr[1]
        self.features = fr[1][2]
        if hasattr(self.t, "max_frame"):
            self.t.max_frame = fr[1][3]
        hb = fr[1][6]
        # §3.3.2: a client MAY bound heartbeat_ms (the reference client: 1 s .. 300 s)
        self.heartbeat = min(max(hb, 1000), 300000) / 1000.0 if hb else None
        return fr

    def sub(self, sub_id, member, flt, qos=0, retained=False, replay=None, credit=None, durable=None):
        fields = {1: sub_id, 2: member.key_id, 3: member.compile_filter(flt), 4: qos, 7: retained}
        if replay is not None:
            fields[6] = [("uint", replay[0]), ("uint", replay[1])]
        if credit is not None:
            fields[8] = credit
        if durable is not None:
            fields[5] = durable.encode()
        return self.send(SUB, fields)

    def pub(self, env, qos=0, retain=False, ack=False, publish_id=None):
        flags = (P_RETAIN if retain else 0) | (P_ACK if ack else 0)
        fields = {1: env, 2: flags, 4: qos}
        if ack or publish_id is not None:
            publish_id = publish_id or secrets.token_bytes(16)
            fields[3] = publish_id
        self.send(PUB, fields)
        return publish_id

    def ack(self, seqs):
        seqs = list(seqs)
        for i in range(0, len(seqs), 4096):
            self.send(ACK, {1: [("uint", s) for s in seqs[i:i + 4096]]})

    # ---- receiving
    def _read_one(self, deadline):
        """one decoded frame (answering Ping, heartbeating while idle), or None at the deadline."""
        while True:
            d = deadline
            if self.heartbeat:
                d = min(d, self.last_sent + self.heartbeat)
            raw = self.t.recv(d)
            if raw is None:
                if time.monotonic() >= deadline:
                    return None
                # idle: §3.5.3 heartbeat
                self.send(PING, {1: secrets.randbits(32)})
                continue
            t, f = F.decode_frame(raw)
            if t == PING:  # §3.5.2: a client MUST answer with the same nonce
                self.pings_from_relay += 1
                self.send(PONG, {1: f[1]})
            elif t == ERR:
                self.errors.append(f)
            elif t == GAP:
                self.gaps += f[1]
            elif t == CLOSE:
                self.closed = f
            return t, f

    def wait(self, pred, timeout):
        """first frame (pending or new) with pred(type, fields); None at the deadline or on close."""
        for i, fr in enumerate(self.pending):
            if pred(*fr):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fr = self._read_one(deadline)
            except Closed as e:
                self.closed = self.closed or ("closed", str(e))
                return None
            if fr is None:
                return None
            if pred(*fr):
                return fr
            self.pending.append(fr)

    def wait_closed(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                fr = self._read_one(deadline)
            except Closed:
                return True
            if fr is None:
                return False
            self.pending.append(fr)

    def drain(self, pred, timeout, ack=False):
        """every frame with pred until the deadline (for 'nothing more arrives' checks);
        ack=True acknowledges each stored Msg as it arrives (QoS >= 1)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            fr = self.wait(pred, max(0.0, deadline - time.monotonic()))
            if fr is None:
                return got
            got.append(fr)
            if ack and fr[0] == MSG and fr[1][1] > 0:
                self.ack([fr[1][1]])

    def collect(self, pred, n, timeout):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            fr = self.wait(pred, max(0.0, deadline - time.monotonic()))
            if fr is None:
                break
            got.append(fr)
        return got

    def roundtrip_ping(self, timeout=5):
        nonce = secrets.randbits(40)
        self.send(PING, {1: nonce})
        return self.wait(lambda t, f: t == PONG and f[1] == nonce, timeout) is not None

    def close(self):
        self.t.close()


def is_msg(t, f):
    return t == MSG


def msg_for(member, pattern_filter):
    pat = member.compile_filter(pattern_filter)
    return lambda t, f: t == MSG and pattern_matches(pat, member.key_id, f[2])


def connect(addr, transport="tcp", label="py", features=ALL_FEATURES):
    tr = TcpTransport(addr) if transport == "tcp" else WsTransport(addr)
    c = Client(tr, label)
    fr = c.hello(features)
    if fr is None or fr[0] != WELCOME:
        raise RuntimeError("no Welcome: %r" % (fr,))
    return c


# ============================================================ processes
class Relay:
    def __init__(self, workdir, *args):
        self.p = subprocess.Popen([RELAY_BIN, "serve", "--ready-file", "-", "--admin", "off"] + list(args),
                                  stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "relay-%d.log" % id(self)), "w"),
                                  cwd=workdir, text=True)
        line = readline_deadline(self.p.stdout, 15)
        if not line:
            raise RuntimeError("relay did not print its addresses")
        self.addrs = json.loads(line)

    def url(self, kind="tcp"):
        return "%s://%s" % (kind, self.addrs[kind])

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def readline_deadline(stream, timeout):
    q = queue.Queue()
    threading.Thread(target=lambda: q.put(stream.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


class Cli:
    def __init__(self, workdir, tree_key):
        self.dir = workdir
        self.keyfile = os.path.join(workdir, "tree.key")
        with open(os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(tree_key + "\n")
        self.idfile = os.path.join(workdir, "cli.identity")
        r = subprocess.run([CLI_BIN, "keygen", "--out", self.idfile, "--force"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode:
            raise RuntimeError("keygen: " + r.stderr)
        self.wspk = None
        for line in open(self.idfile):
            if line.startswith("# sender id"):
                self.wspk = line.split(":", 1)[1].strip()
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("WHISPEER_"):
                del env[k]
        self.env = env

    def pub(self, relay_url, topic, values, qos=0, retain=False, signed=True, extra=()):
        args = [CLI_BIN, "pub", "--relay", relay_url, "--key-file", self.keyfile, "--qos", str(qos), topic]
        if signed:
            args += ["--identity", self.idfile]
        if retain:
            args.append("--retain")
        args += list(extra)
        stdin = "".join(json.dumps(v) + "\n" for v in values)
        r = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, env=self.env)
        return r

    def sub_start(self, relay_url, flt, count, qos=0, timeout=30, extra=()):
        args = [CLI_BIN, "sub", "--relay", relay_url, "--key-file", self.keyfile, "--qos", str(qos),
                "--count", str(count), "--timeout", str(timeout)] + list(extra) + [flt]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        p.err_lines = queue.Queue()

        def pump():
            for line in p.stderr:
                p.err_lines.put(line)
            p.err_lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 20
        p.stderr_text = ""
        while True:
            try:
                line = p.err_lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise RuntimeError("CLI sub did not become ready: " + p.stderr_text)
            p.stderr_text += line
            if line.startswith("ready:"):
                return p

    @staticmethod
    def sub_finish(p, timeout=40):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        while True:
            try:
                line = p.err_lines.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            p.stderr_text += line
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        return p.returncode, lines, p.stderr_text


# ============================================================ checks
def cbor_as_json(v):
    """What the CLI prints for a CBOR value (byte strings become hex)."""
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [cbor_as_json(x) for x in v]
    if isinstance(v, dict):
        return {k: cbor_as_json(x) for k, x in v.items()}
    return v


def open_msgs(member, frames, live=True):
    out = []
    for t, f in frames:
        o = member.open(f[2], live=live and not (f[3] & (M_REPLAYED | M_RETAINED)))
        out.append((f, o))
    return out


def run_checks(work):
    CLI_TIMEOUT = 30
    # ---------------------------------------------------------------- keys
    r = subprocess.run([CLI_BIN, "key", "new", "--tree", "pylive-interop"], capture_output=True, text=True, timeout=30)
    tree_key = r.stdout.strip()
    if not check("cli: key new prints a wstree1 key the Python parser accepts",
                 r.returncode == 0 and tree_key.startswith("wstree1"), r.stderr.strip()):
        return
    py = Member(tree_key)
    cli = Cli(work, tree_key)
    check("cli: keygen identity (sender id %s…)" % (cli.wspk or "?")[:16], cli.wspk and cli.wspk.startswith("wspk1"))

    relay = Relay(work, "--store", "memory", "--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0",
                  "--ack-timeout-ms", "1500")
    TCP, WS = relay.addrs["tcp"], relay.addrs["ws"]
    print("relay: tcp %s ws %s" % (TCP, WS), flush=True)
    try:
        _checks_with_relay(work, py, cli, relay, TCP, WS, CLI_TIMEOUT)
    finally:
        relay.stop()
    _checks_store_none(work, py)


def _checks_with_relay(work, py, cli, relay, TCP, WS, CLI_TIMEOUT):
    # ---------------------------------------------------------------- handshake (§3.5.1)
    c = Client(TcpTransport(TCP), "main")
    fr = c.hello(ALL_FEATURES)
    ok = fr is not None and fr[0] == WELCOME and fr[1][1] == 2 and len(fr[1][4]) == 16 and fr[1][3] > 0
    granted = [n for i, n in enumerate(FEATURE_NAMES) if c.features >> i & 1] if ok else []
    check("tcp: Hello{versions:[2], features:0xff} -> Welcome version 2", ok,
          "max_frame=%s heartbeat_ms=%s seq_space=%s granted=%s" % (
              fr[1].get(3), fr[1].get(6), fr[1].get(7, b"").hex() or None, "|".join(granted)) if ok else repr(fr))
    if c.features != 0:
        note("§3.3.2 says 'The reference relay currently grants 0' features; this relay granted 0x%02x (%s)"
             % (c.features, "|".join(granted)))
    check("tcp: Ping{nonce} -> Pong{same nonce}", c.roundtrip_ping())

    # ---------------------------------------------------------------- CLI pub -> Python sub, QoS 0
    c.sub(1, py, "sensor/kitchen/temp", qos=0)
    so = c.wait(lambda t, f: t == SUBOK and f[1] == 1, 5)
    check("tcp: Sub(exact filter, qos 0) -> SubOk", so is not None, repr(so and so[1]))
    values = [{"temp": 21.5}, [1, 2, 3], "hello", 42, None, True, {"nested": {"a": [1, "x"]}}]
    r = cli.pub(relay.url("tcp"), "sensor/kitchen/temp", values, qos=0)
    check("cli: pub qos 0 of %d values exits 0" % len(values), r.returncode == 0, r.stderr.strip())
    got = c.collect(msg_for(py, "sensor/kitchen/temp"), len(values), 10)
    try:
        opened = open_msgs(py, got)
        ok = ([o.value for _, o in opened] == values and all(o.topic == "sensor/kitchen/temp" for _, o in opened)
              and all(w.wspk(o.sender) == cli.wspk for _, o in opened))
        det = "got %r; content_type=%r codecs=%s sig_schemes=%s" % (
            [o.value for _, o in opened], opened[0][1].content_type if opened else None,
            sorted({o.body.codec for _, o in opened}), sorted({o.body.sig_scheme for _, o in opened})) + " batch counts=%s" % sorted(
            {getattr(o.body, "count", None) for _, o in opened}, key=str)
    except w.WError as e:
        ok, det = False, "open failed: %s" % e
    check("cli pub qos0 -> py sub: exactly the published values, topic and CLI sender verified", ok, det)
    stray = c.drain(is_msg, 0.5)
    check("cli pub qos0 -> py sub: no extra Msg", not stray, "%d extra" % len(stray))

    # ---------------------------------------------------------------- CLI pub -> Python sub, QoS 1, Ack
    c.sub(2, py, "sensor/kitchen/hum", qos=1)
    so = c.wait(lambda t, f: t == SUBOK and f[1] == 2, 5)
    check("tcp: Sub(qos 1) -> SubOk", so is not None)
    hv = [{"hum": 40}, {"hum": 41}, {"hum": 42}]
    r = cli.pub(relay.url("tcp"), "sensor/kitchen/hum", hv, qos=1)
    check("cli: pub qos 1 exits 0", r.returncode == 0, r.stderr.strip())
    got = c.collect(msg_for(py, "sensor/kitchen/hum"), 3, 10)
    try:
        opened = open_msgs(py, got)
        seqs = [f[1] for f, _ in opened]
        ok = [o.value for _, o in opened] == hv and all(s > 0 for s in seqs) and seqs == sorted(seqs)
        det = "seqs=%s" % seqs
    except w.WError as e:
        ok, det, seqs = False, str(e), []
    check("cli pub qos1 -> py sub qos1: values, stored (seq > 0), in sequence order", ok, det)
    # ack the first two, leave the third unacked: only the third must come again, flagged REDELIVERED
    if len(seqs) == 3:
        c.ack(seqs[:2])
        red = c.wait(lambda t, f: t == MSG and f[3] & M_REDELIVERED, 8)
        ok = red is not None and red[1][1] == seqs[2]
        check("qos1: unacked Msg redelivered with REDELIVERED (ack timeout 1.5 s)", ok,
              "got %r" % (((red[1][1], red[1][3]) if red else None),))
        if red:
            c.ack([red[1][1]])
        more = c.drain(lambda t, f: t == MSG and f[3] & M_REDELIVERED, 3.5)
        check("qos1: acked sequences are not redelivered", not more, "redelivered: %s" % [f[1] for _, f in more])

    # ---------------------------------------------------------------- Python pub -> CLI sub, QoS 0, per-message sig
    pv = [{"door": "open", "n": 1}, ["a", 2, None], "x" * 300, 7]
    p = cli.sub_start(relay.url("tcp"), "alerts/door", len(pv), qos=0, timeout=CLI_TIMEOUT)
    fs = []
    for i, v in enumerate(pv):
        env, f = py.seal("alerts/door", v, sign=True, codec_spec=["none", "zstd", "lz4", "none"][i],
                         suite=[1, 1, 3, 3][i])
        fs.append(f)
        c.pub(env, qos=0)
    rc, lines, err = Cli.sub_finish(p)
    ok = (rc == 0 and [l["data"] for l in lines] == [cbor_as_json(v) for v in pv]
          and all(l["sender"] == py.wspk and l["topic"] == "alerts/door" for l in lines)
          and [l["id"] for l in lines] == [f["msg_id"].hex() for f in fs]
          and [l["ts"] for l in lines] == [f["ts_ms"] for f in fs])
    check("py pub qos0 (signed; none/zstd/lz4 codecs; XChaCha and AES-GCM) -> cli sub prints exactly it",
          ok, "rc=%s lines=%s err=%s" % (rc, [(l.get("data"), l.get("sender")) for l in lines][:4], err.strip()[-300:])
          if not ok else "")

    # ---------------------------------------------------------------- Python pub -> CLI sub, QoS 1 with PubAck
    pv = [{"q": 1, "i": i} for i in range(3)]
    p = cli.sub_start(relay.url("tcp"), "alerts/q1", len(pv), qos=1, timeout=CLI_TIMEOUT)
    pubacks = []
    for v in pv:
        env, _ = py.seal("alerts/q1", v)
        pid = c.pub(env, qos=1, ack=True)
        pa = c.wait(lambda t, f, pid=pid: (t == PUBACK and f[1] == pid) or (t == ERR and f.get(5) == pid), 5)
        pubacks.append(pa)
    ok = all(pa and pa[0] == PUBACK and pa[1][2] > 0 for pa in pubacks)
    check("py pub qos1 + ACK flag -> PubAck{same publish_id, seq > 0}", ok,
          "seqs=%s" % [pa and pa[1].get(2) for pa in pubacks])
    rc, lines, err = Cli.sub_finish(p)
    ok = (rc == 0 and [l["data"] for l in lines] == pv and all(l["sender"] == py.wspk for l in lines)
          and [l["seq"] for l in lines] == [pa[1][2] for pa in pubacks if pa])
    check("py pub qos1 -> cli sub --qos 1 prints exactly it, with the PubAck sequences", ok,
          "" if ok else "rc=%s lines=%s err=%s" % (rc, lines, err.strip()[-300:]))

    # ---------------------------------------------------------------- batch signatures (§4.14)
    items = [("batch/a", {"b": 0}), ("batch/b/c", {"b": 1}), ("batch/a", {"b": 2}), ("batch/d", "four"),
             ("batch/a", {"b": 4})]
    p = cli.sub_start(relay.url("tcp"), "batch/#", len(items), qos=0, timeout=CLI_TIMEOUT)
    envs, fs = py.seal_batch(items, codec_spec="zstd")
    for env in envs:
        c.pub(env, qos=0)
    rc, lines, err = Cli.sub_finish(p)
    ok = (rc == 0 and [(l["topic"], l["data"]) for l in lines] == items
          and all(l["sender"] == py.wspk for l in lines))
    check("py pub batch-signed (sig_scheme 2, 5 messages, 3 topics) -> cli sub verifies and prints all", ok,
          "" if ok else "rc=%s lines=%s err=%s" % (rc, lines, err.strip()[-400:]))

    # unsigned
    p = cli.sub_start(relay.url("tcp"), "anon/x", 1, timeout=CLI_TIMEOUT)
    env, _ = py.seal("anon/x", {"who": "nobody"}, sign=False)
    c.pub(env)
    rc, lines, err = Cli.sub_finish(p)
    check("py pub unsigned (sig_scheme 0) -> cli sub prints sender null",
          rc == 0 and len(lines) == 1 and lines[0]["sender"] is None and lines[0]["data"] == {"who": "nobody"},
          "" if rc == 0 else err.strip()[-300:])

    # ---------------------------------------------------------------- wildcards (§3.4.1, §8)
    c.sub(10, py, "wild/+/temp", qos=0)
    c.sub(11, py, "wild/#", qos=0)
    oks = [c.wait(lambda t, f, i=i: t == SUBOK and f[1] == i, 5) for i in (10, 11)]
    check("tcp: Sub with '+' and with '#' -> SubOk", all(oks))
    plan = [("wild/kitchen/temp", 1), ("wild/garage/temp", 2), ("wild/kitchen/hum", 3), ("other/kitchen/temp", 4),
            ("wild", 5), ("wild/a/b/temp", 6)]
    for topic, v in plan:
        r = cli.pub(relay.url("tcp"), topic, [v])
        if r.returncode:
            check("cli pub %s" % topic, False, r.stderr.strip())
    got = c.collect(is_msg, 5, 10)
    got += c.drain(is_msg, 0.5)
    try:
        opened = open_msgs(py, got)
        topics = [o.topic for _, o in opened]
    except w.WError as e:
        opened, topics = [], ["open failed: %s" % e]
    # 'wild/#' matches wild itself too (§8.3); other/... matches nothing; one Msg per connection
    want_conn = ["wild/kitchen/temp", "wild/garage/temp", "wild/kitchen/hum", "wild", "wild/a/b/temp"]
    check("wildcards: the connection gets each matching message once, nothing else", topics == want_conn,
          "got %s" % topics)
    p_plus = py.compile_filter("wild/+/temp")
    p_hash = py.compile_filter("wild/#")
    plus = [o.topic for f, o in opened if pattern_matches(p_plus, py.key_id, f[2])]
    hsh = [o.topic for f, o in opened if pattern_matches(p_hash, py.key_id, f[2])]
    check("wildcards: client-side token routing: '+' gets 2, '#' gets 5",
          plus == ["wild/kitchen/temp", "wild/garage/temp"] and hsh == want_conn, "+:%s #:%s" % (plus, hsh))
    # CLI wildcard subscriber, Python publisher
    p = cli.sub_start(relay.url("tcp"), "dev/+/state", 2, timeout=CLI_TIMEOUT)
    for topic, v in [("dev/a/other", "no"), ("dev/a/state", "on"), ("dev/a/b/state", "no"), ("dev/b/state", "off")]:
        env, _ = py.seal(topic, v)
        c.pub(env)
    rc, lines, err = Cli.sub_finish(p)
    check("wildcards: py pub -> cli sub 'dev/+/state' prints only the 2 matching",
          rc == 0 and [(l["topic"], l["data"]) for l in lines] == [("dev/a/state", "on"), ("dev/b/state", "off")],
          "rc=%s %s %s" % (rc, lines, err.strip()[-200:]))

    # ---------------------------------------------------------------- retained values (§3.5.5)
    for v in ("eco", "turbo"):
        env, _ = py.seal("cfg/mode", v)
        pid = c.pub(env, qos=0, retain=True, ack=True)
        pa = c.wait(lambda t, f, pid=pid: t in (PUBACK, ERR) and (f.get(1) == pid or f.get(5) == pid), 5)
    check("retain: py Pub{RETAIN|ACK} qos 0 -> PubAck", pa is not None and pa[0] == PUBACK, repr(pa))
    r = cli.pub(relay.url("tcp"), "cfg/fan", ["high"], retain=True)
    check("retain: cli pub --retain exits 0", r.returncode == 0, r.stderr.strip())
    c2 = connect(TCP, label="retained")
    c2.sub(1, py, "cfg/#", qos=0, retained=True)
    so = c2.wait(lambda t, f: t == SUBOK and f[1] == 1, 5)
    rmsgs = c2.collect(lambda t, f: t == MSG and f[3] & M_RETAINED, 2, 5)
    rd = c2.wait(lambda t, f: t == REPLAYDONE and f[1] == 1, 5) if c2.features & 0x80 else None
    try:
        ro = sorted(((o.topic, o.value) for f, o in open_msgs(py, rmsgs)))
    except w.WError as e:
        ro = ["open failed %s" % e]
    check("retain: Sub{retained:true} 'cfg/#' -> SubOk, one RETAINED Msg per path (latest value)",
          so is not None and ro == [("cfg/fan", "high"), ("cfg/mode", "turbo")]
          and all(f.get(4) == 1 for _, f in rmsgs), "got %s sub_ids=%s" % (ro, [f.get(4) for _, f in rmsgs]))
    if c2.features & 0x80:
        check("retain: with HISTORY_END: SubOk.history=true and ReplayDone{count:2}",
              so is not None and so[1].get(3) is True and rd is not None and rd[1][3] == 2,
              "SubOk=%r ReplayDone=%r" % (so and so[1], rd and rd[1]))
    p = cli.sub_start(relay.url("tcp"), "cfg/mode", 1, timeout=CLI_TIMEOUT)
    rc, lines, err = Cli.sub_finish(p)
    check("retain: cli sub gets the Python-retained value 'turbo'",
          rc == 0 and [l["data"] for l in lines] == ["turbo"], "rc=%s %s %s" % (rc, lines, err.strip()[-200:]))
    c2.close()

    # ---------------------------------------------------------------- replay (§3.4.3, §3.5.5)
    logv = [{"line": i} for i in range(4)]
    lseqs = []
    for v in logv:
        env, _ = py.seal("log/app", v)
        pid = c.pub(env, qos=1, ack=True)
        pa = c.wait(lambda t, f, pid=pid: t == PUBACK and f[1] == pid, 5)
        lseqs.append(pa and pa[1][2])
    env, _ = py.seal("log/app", {"line": "qos0"})
    pid0 = c.pub(env, qos=0, ack=True)
    pa0 = c.wait(lambda t, f: t == PUBACK and f[1] == pid0, 5)
    c3 = connect(TCP, label="replay")
    c3.sub(1, py, "log/#", qos=1, replay=(1, 0))
    so = c3.wait(lambda t, f: t == SUBOK and f[1] == 1, 5)
    hist = []
    rd = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        fr = c3.wait(lambda t, f: (t == MSG and f.get(4) == 1) or (t == REPLAYDONE and f[1] == 1),
                     deadline - time.monotonic())
        if fr is None or fr[0] == REPLAYDONE:
            rd = fr
            break
        hist.append(fr)
    try:
        ho = [(f[1], o.value, f[3]) for f, o in open_msgs(py, hist)]
    except w.WError as e:
        ho = [("open failed", str(e))]
    ok = (so is not None and [x[1] for x in ho] == logv and [x[0] for x in ho] == lseqs
          and all(x[2] & M_REPLAYED for x in ho) and rd is not None and rd[1][2] == so[1][2] and rd[1][3] == 4)
    check("replay: Sub{replay:[1,0]} -> SubOk{seq:B}, 4 REPLAYED Msg (sub_id set, PubAck seqs), ReplayDone{B, 4}",
          ok, "SubOk=%r hist=%s ReplayDone=%r" % (so and so[1], ho, rd and rd[1]))
    c3.ack([x[0] for x in ho if isinstance(x[0], int)])
    if pa0 is not None:
        note("replay: a QoS 0 publish (PubAck seq %d) was %s in the replay (relay default store_qos0=false); "
             "§3.5.5 says a QoS 0 publish 'is stored too, but not yet durably'"
             % (pa0[1][2], "included" if any(x[1] == {"line": "qos0"} for x in ho) else "NOT included"))
    env, _ = py.seal("log/app", {"line": "live"})
    c.pub(env, qos=1, ack=True)
    live = c3.wait(msg_for(py, "log/#"), 5)
    ok = live is not None and not (live[1][3] & (M_REPLAYED | M_RETAINED)) and 4 not in live[1] and \
        py.open(live[1][2]).value == {"line": "live"} and live[1][1] > (so[1][2] if so else 0)
    check("replay: after ReplayDone, a live Msg (no sub_id, no REPLAYED, seq > B)", ok, repr(live and live[1].get(3)))
    if live:
        c3.ack([live[1][1]])
    c3.sub(2, py, "log/app", qos=1, replay=(3, 2))
    h2 = []
    while True:
        fr = c3.wait(lambda t, f: (t == MSG and f.get(4) == 2) or (t == REPLAYDONE and f[1] == 2), 5)
        if fr is None or fr[0] == REPLAYDONE:
            break
        h2.append(fr)
    try:
        vals = [o.value for f, o in open_msgs(py, h2)]
    except w.WError as e:
        vals = str(e)
    check("replay: Sub{replay:[3 (last N), 2]} -> the last 2 stored", vals == [{"line": 3}, {"line": "live"}],
          repr(vals))
    c3.ack([f[1] for _, f in h2])
    c3.close()
    p = cli.sub_start(relay.url("tcp"), "log/app", 5, qos=1, timeout=CLI_TIMEOUT, extra=["--from", "0"])
    rc, lines, err = Cli.sub_finish(p)
    check("replay: cli sub --from 0 prints the Python-published history",
          rc == 0 and [l["data"] for l in lines] == logv + [{"line": "live"}], "rc=%s %s %s" % (
              rc, [l["data"] for l in lines], err.strip()[-200:]))
    # CLI-published QoS 1 history, read by a Python replay
    c4 = connect(TCP, label="replay2")
    c4.sub(1, py, "sensor/kitchen/hum", qos=1, replay=(1, 0))
    h = c4.collect(lambda t, f: t == MSG and f.get(4) == 1, 3, 5)
    try:
        vals = [o.value for f, o in open_msgs(py, h)]
    except w.WError as e:
        vals = str(e)
    check("replay: py Sub{replay from 0} gets the CLI's QoS 1 history", vals == hv, repr(vals))
    c4.close()

    # ---------------------------------------------------------------- QoS 2 dedup (§3.5.5)
    env, _ = py.seal("dedup/x", "once")
    c5 = connect(TCP, label="dedup-sub")
    c5.sub(1, py, "dedup/x", qos=1)
    c5.wait(lambda t, f: t == SUBOK, 5)
    pid = secrets.token_bytes(16)
    c.pub(env, qos=2, ack=True, publish_id=pid)
    a1 = c.wait(lambda t, f: t == PUBACK and f[1] == pid, 5)
    c.pub(env, qos=2, ack=True, publish_id=pid)
    a2 = c.wait(lambda t, f: t == PUBACK and f[1] == pid, 5)
    m = c5.drain(is_msg, 1.5, ack=True)
    check("qos2: re-sent publish_id -> PubAck with the original seq, delivered once",
          a1 and a2 and a1[1][2] == a2[1][2] and len(m) == 1, "seqs %s/%s, delivered %d" % (
              a1 and a1[1][2], a2 and a2[1][2], len(m)))
    c5.close()

    # ---------------------------------------------------------------- QoS 0 publish at a QoS 1 subscription
    cq = connect(TCP, label="q0-at-q1")
    cq.sub(1, py, "mix/#", qos=1)
    cq.wait(lambda t, f: t == SUBOK, 5)
    env, _ = py.seal("mix/x", "qos0 publish")
    pid = c.pub(env, qos=0, ack=True)
    pa = c.wait(lambda t, f: t == PUBACK and f[1] == pid, 5)
    m1 = cq.wait(is_msg, 5)
    m2 = cq.wait(lambda t, f: t == MSG and f[3] & M_REDELIVERED, 4)
    if pa and m1:
        note("a QoS 0 publish (not kept in history with store_qos0=false) got PubAck.seq=%d and Msg.seq=%d, "
             "and was %s to an unacknowledging QoS 1 subscriber; §3.3.7/§3.3.9 say seq is '0 when not stored' and "
             "§3.5.4 speaks of 'a live-only Msg with sequence 0 to a QoS >= 1 subscription'"
             % (pa[1][2], m1[1][1], "REDELIVERED" if m2 else "not redelivered"))
    if m1:
        cq.ack([m1[1][1]])
    more = cq.drain(lambda t, f: t == MSG and f[3] & M_REDELIVERED, 3)
    check("qos1 sub: acking the (numbered) QoS 0 message stops its redelivery", m1 is not None and not more,
          "%d more" % len(more))
    cq.close()

    # ---------------------------------------------------------------- durable subscriptions (§3.5.5)
    owner = secrets.token_bytes(32)
    d1 = connect(TCP, label="durable1")

    def dsub(cl, sub_id, own, tries=20):
        for _ in range(tries):
            fields = {1: sub_id, 2: py.key_id, 3: py.compile_filter("dur/#"), 4: 1, 5: b"pylive-d", 7: False}
            if own is not None:
                fields[9] = own
            cl.send(SUB, fields)
            fr = cl.wait(lambda t, f: (t == SUBOK and f[1] == sub_id) or (t == ERR and f.get(4) == sub_id), 5)
            if fr is None or fr[0] == SUBOK or fr[1][1] != 19:  # retry only on busy (retryable)
                return fr
            cl.drain(lambda t, f: False, 0.2)  # back off: read frames for 200 ms
        return fr
    so = dsub(d1, 1, owner)
    dv = ["d0", "d1", "d2"]
    for v in dv:
        env, _ = py.seal("dur/x", v)
        pid = c.pub(env, qos=1, ack=True)
        c.wait(lambda t, f, pid=pid: t == PUBACK and f[1] == pid, 5)
    got = d1.collect(is_msg, 3, 5)
    d1.ack([f[1] for _, f in got[:2]])
    d1.roundtrip_ping()  # the Ack is handled before the Pong
    d1.send(CLOSE, {1: 0, 2: b"bye"})
    d1.wait_closed(5)
    d1.close()
    env, _ = py.seal("dur/x", "d3")
    pid = c.pub(env, qos=1, ack=True)
    c.wait(lambda t, f: t == PUBACK and f[1] == pid, 5)
    d2 = connect(TCP, label="durable2")
    wrong = dsub(d2, 1, secrets.token_bytes(32))
    check("durable: resuming with another owner secret -> non-fatal Err(not_allowed=9)",
          wrong is not None and wrong[0] == ERR and wrong[1][1] == 9 and not wrong[1][3], repr(wrong and wrong[1]))
    so2 = dsub(d2, 2, owner)
    hist = []
    rd = None
    while True:
        fr = d2.wait(lambda t, f: (t == MSG and f.get(4) == 2) or (t == REPLAYDONE and f[1] == 2), 5)
        if fr is None or fr[0] == REPLAYDONE:
            rd = fr
            break
        hist.append(fr)
    try:
        vals = [(o.value, bool(f[3] & M_REPLAYED)) for f, o in open_msgs(py, hist)]
    except w.WError as e:
        vals = str(e)
    check("durable: resumed by name+owner -> the unacked and the missed message, REPLAYED, then ReplayDone",
          so is not None and so[0] == SUBOK and so2 is not None and so2[0] == SUBOK
          and vals == [("d2", True), ("d3", True)] and rd is not None,
          "SubOk=%r got %r ReplayDone=%r" % (so2 and so2[1], vals, rd and rd[1]))
    d2.ack([f[1] for _, f in hist])
    if d2.features & 0x40:
        n_err = len(d2.errors)
        d2.send(UNSUB, {1: 2, 2: True})
        ok = d2.roundtrip_ping() and len(d2.errors) == n_err
        d3 = connect(TCP, label="durable3")
        so3 = dsub(d3, 1, secrets.token_bytes(32))  # a new owner may take the name once deleted
        check("durable: Unsub{delete:true} -> no Err before Pong; the name is free for a new owner",
              ok and so3 is not None and so3[0] == SUBOK, "errors=%r new=%r" % (d2.errors[n_err:], so3 and so3[1]))
        d3.close()
    d2.close()

    # ---------------------------------------------------------------- flow control: credit (§3.3.3 key 8)
    if c.features & 0x20:
        c6 = connect(TCP, label="credit")
        c6.sub(1, py, "flow/#", qos=1, credit=2)
        c6.wait(lambda t, f: t == SUBOK, 5)
        for i in range(5):
            env, _ = py.seal("flow/x", i)
            pid = c.pub(env, qos=1, ack=True)
            c.wait(lambda t, f, pid=pid: t == PUBACK and f[1] == pid, 5)
        fresh = lambda t, f: t == MSG and not f[3] & M_REDELIVERED  # noqa: E731
        batches, held_back = [], []
        for want in (2, 2, 1):
            b = c6.collect(fresh, want, 5)
            # nothing more may come while `want` are unacknowledged (window < the 1.5 s ack timeout)
            held_back.append(len(c6.drain(fresh, 1.0)))
            batches.append(b)
            c6.ack([f[1] for _, f in b])
        vals = [py.open(f[2]).value for b in batches for _, f in b]
        check("flow control: credit 2 -> at most 2 Msg in flight; each Ack frees credit; all 5 in order",
              [len(b) for b in batches] == [2, 2, 1] and held_back == [0, 0, 0] and vals == list(range(5)),
              "batches %s, extra while paused %s, values %s" % ([len(b) for b in batches], held_back, vals))
        c6.close()

    # ---------------------------------------------------------------- Err frames (§3.4.7, §3.5.2)
    c.send(UNSUB, {1: 999})
    e = c.wait(lambda t, f: t == ERR, 5)
    check("err: Unsub unknown sub_id -> non-fatal Err(unknown_subscription=17, sub_id)",
          e is not None and e[1][1] == 17 and e[1][3] is False and e[1].get(4) == 999, repr(e and e[1]))
    check("err: the connection carries on after a non-fatal Err", c.roundtrip_ping())
    n_err = len(c.errors)
    c.send(ACK, {1: [("uint", 987654321)]})
    check("ack: an unknown sequence is ignored (no Err)", c.roundtrip_ping() and len(c.errors) == n_err,
          repr(c.errors[n_err:]))
    # fatal: '#' not last
    c7 = connect(TCP, label="badfilter")
    c7.send(SUB, {1: 1, 2: py.key_id, 3: [("uint", 2), ("bytes", b"\0" * 16)], 4: 0, 7: False})
    e = c7.wait(lambda t, f: t == ERR, 5)
    closed = c7.wait_closed(5)
    check("err: Sub with '#' not last -> fatal Err(invalid_filter=5), connection closed",
          e is not None and e[1][1] == 5 and e[1][3] is True and closed, repr(e and e[1]))
    # frame before Hello
    t8 = TcpTransport(TCP)
    c8 = Client(t8, "nohello")
    c8.send(PING, {1: 1})
    e = c8.wait(lambda t, f: t == ERR, 5)
    check("err: a frame before Hello -> fatal Err(protocol_violation=15)",
          e is not None and e[1][1] == 15 and e[1][3] is True and c8.wait_closed(5), repr(e and e[1]))
    # version 1 only
    c9 = Client(TcpTransport(TCP), "v1")
    fr = c9.hello(versions=(1,))
    check("err: Hello{versions:[1]} -> fatal Err(unsupported_version=2)",
          fr is not None and fr[0] == ERR and fr[1][1] == 2 and fr[1][3] is True,
          repr(fr and fr[1]))
    # zero length prefix
    c10 = Client(TcpTransport(TCP), "zero")
    c10.hello()
    c10.t.send_raw(b"\0\0\0\0")
    e = c10.wait(lambda t, f: t == ERR, 5)
    check("err: zero TCP length prefix -> fatal Err(malformed=1)",
          e is not None and e[1][1] == 1 and e[1][3] is True, repr(e and e[1]))
    # a Pub whose envelope fails §4.2
    c11 = connect(TCP, label="badenv")
    c11.t.send(bytes.fromhex("a4000601") + b"\x58\x4c" + b"\x02\x01\x00" + b"\0" * 73 + bytes.fromhex("02000400"))
    e = c11.wait(lambda t, f: t == ERR, 5)
    check("err: Pub with an envelope failing §4.2 -> fatal Err(invalid_envelope=16 or malformed=1)",
          e is not None and e[1][1] in (16, 1) and e[1][3] is True, repr(e and e[1]))
    # relay-to-client frame sent by the client
    c12 = connect(TCP, label="wrongdir")
    c12.send(PUBACK, {1: b"\1" * 16, 2: 0})
    e = c12.wait(lambda t, f: t == ERR, 5)
    check("err: a client sending PubAck -> fatal Err(protocol_violation=15)",
          e is not None and e[1][1] == 15 and e[1][3] is True, repr(e and e[1]))
    # unknown key in a frame is skipped (§3.1)
    c13 = connect(TCP, label="unknownkey")
    c13.t.send(bytes.fromhex("a3000b0105") + bytes.fromhex("18") + bytes([40]) + bytes.fromhex("a1016178"))
    p = c13.wait(lambda t, f: t in (PONG, ERR), 5)
    check("cbor: an unknown key (40: a map) is skipped by the relay", p is not None and p[0] == PONG and p[1][1] == 5,
          repr(p))
    # Close from the client
    c13.send(CLOSE, {1: 0, 2: b"bye"})
    check("close: Close from the client ends the connection", c13.wait_closed(5))
    for x in (c8, c9, c10, c11, c12):
        x.close()

    # relay-sent Ping never seen on TCP during this run
    note("relay Ping frames received on TCP during the run: %d (answered with Pong)" % c.pings_from_relay)

    # ---------------------------------------------------------------- WebSocket (§2.1)
    try:
        ws = Client(WsTransport(WS), "ws")
        fr = ws.hello()
        check("ws: Hello -> Welcome version 2 over one binary message per frame", fr and fr[0] == WELCOME and
              fr[1][1] == 2, repr(fr))
        check("ws: Ping -> Pong", ws.roundtrip_ping())
        ws.sub(1, py, "wsroom/#", qos=1)
        ws.wait(lambda t, f: t == SUBOK, 5)
        r = cli.pub(relay.url("ws"), "wsroom/chat", [{"m": "hi over ws"}, {"m": "two"}], qos=1)
        got = ws.collect(is_msg, 2, 10)
        try:
            vals = [o.value for f, o in open_msgs(py, got)]
        except w.WError as e:
            vals = str(e)
        check("ws: cli pub ws:// qos1 -> py ws sub opens exactly the values", r.returncode == 0 and
              vals == [{"m": "hi over ws"}, {"m": "two"}], "%r %s" % (vals, r.stderr.strip()))
        ws.ack([f[1] for _, f in got])
        p = cli.sub_start(relay.url("ws"), "wsroom/+", 2, qos=1, timeout=CLI_TIMEOUT)
        for v in ("a", "b"):
            env, _ = py.seal("wsroom/py", v)
            pid = ws.pub(env, qos=1, ack=True)
            ws.wait(lambda t, f, pid=pid: t == PUBACK and f[1] == pid, 5)
        rc, lines, err = Cli.sub_finish(p)
        check("ws: py ws pub qos1 -> cli sub ws:// prints exactly it",
              rc == 0 and [(l["data"], l["sender"]) for l in lines] == [("a", py.wspk), ("b", py.wspk)],
              "rc=%s %s %s" % (rc, lines, err.strip()[-200:]))
        ws.close()
        wt = Client(WsTransport(WS), "wstext")
        wt.hello()
        wt.t.send_text("hello")
        e = wt.wait(lambda t, f: t == ERR, 5)
        check("ws: a text message -> fatal Err(protocol_violation=15)",
              e is not None and e[1][1] == 15 and e[1][3] is True, repr(e and e[1]))
        wt.close()
    except ImportError:
        check("ws: websocket-client installed", False, "pip install websocket-client")

    c.close()


def _checks_store_none(work, py):
    relay = Relay(work, "--store", "none", "--tcp", "127.0.0.1:0", "--ws", "off")
    try:
        c = connect(relay.addrs["tcp"], label="nostore")
        check("store none: Welcome does not grant AT_LEAST_ONCE/REPLAY",
              not (c.features & 0x01) and not (c.features & 0x08), "features=0x%02x" % c.features)
        env, _ = py.seal("ns/x", 1)
        pid = c.pub(env, qos=1, ack=True)
        e = c.wait(lambda t, f: t in (ERR, PUBACK), 5)
        check("store none: QoS 1 Pub -> non-fatal Err(store_failed=14, publish_id)",
              e is not None and e[0] == ERR and e[1][1] == 14 and e[1][3] is False and e[1].get(5) == pid,
              repr(e))
        c.sub(3, py, "ns/#", qos=0, replay=(1, 0))
        e = c.wait(lambda t, f: t in (ERR, SUBOK), 5)
        check("store none: Sub with replay -> non-fatal Err(not_allowed=9, sub_id)",
              e is not None and e[0] == ERR and e[1][1] == 9 and e[1][3] is False and e[1].get(4) == 3, repr(e))
        check("store none: connection still usable", c.roundtrip_ping())
        c.close()
    finally:
        relay.stop()


def main():
    work = tempfile.mkdtemp(prefix="pylive-")
    try:
        run_checks(work)
    except Exception as e:  # a crash is a failed check, not a silent pass
        import traceback
        traceback.print_exc()
        check("no unexpected exception", False, "%s: %s" % (type(e).__name__, e))
    passed = sum(1 for _, ok in RESULTS if ok)
    print("\n%d/%d checks passed (logs in %s)" % (passed, len(RESULTS), work))
    sys.exit(0 if RESULTS and passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
