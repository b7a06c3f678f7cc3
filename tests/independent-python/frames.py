"""Relay frames (§2.2, §3.1, §3.3): strict CBOR decoder and per-type schema."""
import struct
import whispeer as w

ABS_MAX = 64 * 1024 * 1024


class FErr(w.WError):
    pass


# ---------------------------------------------------------------- generic strict CBOR
def _head(b, i):
    if i >= len(b):
        raise FErr("truncated")
    ib = b[i]
    mt, ai = ib >> 5, ib & 31
    i += 1
    if ai < 24:
        return mt, ai, i
    if ai in (24, 25, 26, 27):
        n = 1 << (ai - 24)
        if i + n > len(b):
            raise FErr("truncated")
        return mt, int.from_bytes(b[i:i + n], "big"), i + n
    if ai == 31:
        if mt == 7:
            raise FErr("stray break")
        raise FErr("indefinite lengths are not allowed")
    raise FErr("invalid CBOR (reserved additional info %d)" % ai)


def decode_item(b, i, depth, max_entries=64, max_depth=8):
    """returns ((kind, value), i). kinds: uint neg bytes text array map simple float"""
    if depth > max_depth:
        raise FErr("nested too deeply")
    start = i
    if i < len(b) and (b[i] >> 5) == 7:
        ai = b[i] & 31
        if ai in (25, 26, 27):
            n = 1 << (ai - 24)
            if i + 1 + n > len(b):
                raise FErr("truncated")
            return ("float", b[i + 1:i + 1 + n]), i + 1 + n
    mt, v, i = _head(b, i)
    if mt == 0:
        return ("uint", v), i
    if mt == 1:
        return ("neg", -1 - v), i
    if mt in (2, 3):
        if v > len(b) - i:
            raise FErr("truncated: declared length exceeds input")
        return ("bytes" if mt == 2 else "text", b[i:i + v]), i + v
    if mt == 4:
        if v > max_entries:
            raise FErr("array of %d entries exceeds the limit" % v)
        items = []
        for _ in range(v):
            it, i = decode_item(b, i, depth + 1, 64, max_depth)
            items.append(it)
        return ("array", items), i
    if mt == 5:
        if v > max_entries:
            raise FErr("map of %d entries exceeds the limit" % v)
        items = []
        for _ in range(v):
            k, i = decode_item(b, i, depth + 1, 64, max_depth)
            val, i = decode_item(b, i, depth + 1, 64, max_depth)
            items.append((k, val))
        return ("map", items), i
    if mt == 6:
        raise FErr("tags are not allowed")
    if mt == 7:
        return ("simple", v), i
    raise FErr("invalid CBOR")


# ---------------------------------------------------------------- schema
# field spec: (name, type, required, always_written, default, check)
def _uint(lim=None):
    def c(v):
        if lim is not None and v > lim:
            raise FErr("value %d out of range" % v)
    return ("uint", c)


def _bstr(lo, hi):
    def c(v):
        if not lo <= len(v) <= hi:
            raise FErr("byte string of %d bytes out of range" % len(v))
    return ("bytes", c)


def _tstr(lo, hi):
    def c(v):
        if not lo <= len(v) <= hi:
            raise FErr("text of %d bytes out of range" % len(v))
        try:
            v.decode("utf-8")
        except UnicodeDecodeError:
            raise FErr("text not UTF-8")
    return ("text", c)


BOOL = ("bool", None)


def _qos():
    def c(v):
        if v > 2:
            raise FErr("qos %d: must be 0, 1 or 2" % v)
    return ("uint", c)


def _envelope():
    def c(v):
        try:
            w.parse_envelope(v)
        except w.WError as e:
            raise FErr("invalid envelope: %s" % e)
    return ("bytes", c)


def _versions(v):
    if not 1 <= len(v) <= 8 or any(k != "uint" for k, _ in v):
        raise FErr("versions: 1 to 8 uints")


def _filter(v):
    if not 1 <= len(v) <= 32:
        raise FErr("filter of %d elements exceeds 1..32" % len(v))
    for idx, (k, x) in enumerate(v):
        if k == "bytes" and len(x) == 16:
            continue
        if k == "uint" and x == 1:
            continue
        if k == "uint" and x == 2:
            if idx != len(v) - 1:
                raise FErr("'#' may only be the last level")
            continue
        raise FErr("bad filter element")


def _replay(v):
    if len(v) != 2 or any(k != "uint" for k, _ in v) or v[0][1] not in (1, 2, 3):
        raise FErr("bad replay")


def _seqs(v):
    if len(v) > 4096 or any(k != "uint" for k, _ in v):
        raise FErr("bad seqs")


U = _uint()
SCHEMA = {
    1: ("Hello", {1: ("versions", ("array", _versions), True, True, None),
                  2: ("features", U, False, True, 0),
                  3: ("client", _tstr(0, 1024), False, False, None),
                  4: ("auth", _bstr(0, 1024), False, False, None),
                  5: ("account", _bstr(32, 32), False, False, None)}),
    2: ("Welcome", {1: ("version", U, True, True, None),
                    2: ("features", U, False, True, 0),
                    3: ("max_frame", U, True, True, None),
                    4: ("session", _bstr(16, 16), True, True, None),
                    5: ("relay", _tstr(0, 1024), False, False, None),
                    6: ("heartbeat_ms", U, False, True, 0),
                    7: ("seq_space", _bstr(16, 16), False, False, None)}),
    3: ("Sub", {1: ("sub_id", U, True, True, None),
                2: ("key_id", _bstr(16, 16), True, True, None),
                3: ("filter", ("array", _filter), True, True, None),
                4: ("qos", _qos(), False, True, 0),
                5: ("durable", _tstr(0, 1024), False, False, None),
                6: ("replay", ("array", _replay), False, False, None),
                7: ("retained", BOOL, False, True, True),
                8: ("credit", U, False, False, None),
                9: ("owner", _bstr(16, 64), False, False, None)}),
    4: ("Unsub", {1: ("sub_id", U, True, True, None),
                  2: ("delete", BOOL, False, False, None)}),
    5: ("SubOk", {1: ("sub_id", U, True, True, None),
                  2: ("seq", U, False, True, 0),
                  3: ("history", BOOL, False, False, None)}),
    6: ("Pub", {1: ("envelope", _envelope(), True, True, None),
                2: ("flags", U, False, True, 0),
                3: ("publish_id", _bstr(16, 16), False, False, None),
                4: ("qos", _qos(), False, True, 0)}),
    7: ("Msg", {1: ("seq", U, False, True, 0),
                2: ("envelope", _envelope(), True, True, None),
                3: ("flags", U, False, True, 0),
                4: ("sub_id", U, False, False, None),
                5: ("paused", ("array", _seqs), False, False, None)}),
    8: ("Ack", {1: ("seqs", ("array", _seqs), True, True, None)}),
    9: ("PubAck", {1: ("publish_id", _bstr(16, 16), True, True, None),
                   2: ("seq", U, False, True, 0)}),
    10: ("Err", {1: ("code", _uint(65535), True, True, None),
                 2: ("message", _tstr(0, 1024), False, True, b""),
                 3: ("fatal", BOOL, False, True, False),
                 4: ("sub_id", U, False, False, None),
                 5: ("publish_id", _bstr(16, 16), False, False, None)}),
    11: ("Ping", {1: ("nonce", U, False, True, 0)}),
    12: ("Pong", {1: ("nonce", U, False, True, 0)}),
    13: ("Gap", {1: ("dropped", U, False, True, 0),
                 2: ("sub_id", U, False, False, None)}),
    14: ("Close", {1: ("code", _uint(65535), True, True, None),
                   2: ("message", _tstr(0, 1024), False, True, b"")}),
    15: ("ReplayDone", {1: ("sub_id", U, True, True, None),
                        2: ("seq", U, False, True, 0),
                        3: ("count", U, False, True, 0)}),
    16: ("Challenge", {1: ("nonce", _bstr(32, 32), True, True, None),
                       2: ("bound", BOOL, False, False, None)}),
    17: ("Auth", {1: ("sig", _bstr(64, 64), True, True, None),
                  2: ("relay", _tstr(1, 255), False, False, None)}),
}


def _check_type(want, item):
    k, v = item
    if want == "bool":
        if k != "simple" or v not in (20, 21):
            raise FErr("wrong CBOR type: expected bool")
        return v == 21
    if k != want:
        raise FErr("wrong CBOR type: expected %s" % want)
    return v


def decode_frame(b):
    if len(b) > ABS_MAX:
        raise FErr("frame exceeds the limit")
    if not b:
        raise FErr("truncated")
    mt, n, i = _head(b, 0)
    if mt != 5:
        if mt == 6:
            raise FErr("tags are not allowed")
        raise FErr("expected a CBOR map")
    if n == 0:
        raise FErr("map with no type")
    if n > 64:
        raise FErr("map of %d entries exceeds the limit" % n)
    fields = {}
    ftype = None
    schema = None
    for idx in range(n):
        kitem, i = decode_item(b, i, 1)
        if kitem[0] != "uint":
            raise FErr("a key that is not an unsigned integer")
        key = kitem[1]
        if idx == 0 and key != 0:
            raise FErr("key 0 (the frame type) must come first")
        if key in fields or (key == 0 and idx != 0):
            raise FErr("duplicate field %d" % key)
        if idx == 0:
            titem, i = decode_item(b, i, 1)
            if titem[0] != "uint":
                raise FErr("frame type not a uint")
            ftype = titem[1]
            if ftype not in SCHEMA:
                raise FErr("unknown frame type %d" % ftype)
            schema = SCHEMA[ftype][1]
            fields[0] = ftype
            continue
        spec = schema.get(key)
        if spec is None:
            # unknown key: skip with the §3.1 rules (value at depth 0)
            _, i = decode_item(b, i, 0)
            fields[key] = None
            continue
        name, (want, chk), req, always, default = spec
        max_entries = 4096 if (ftype, key) in ((8, 1), (7, 5)) else 64
        item, i = decode_item(b, i, 1, max_entries=max_entries, max_depth=9)
        v = _check_type(want, item)
        if chk:
            chk(v)
        fields[key] = v
    if i != len(b):
        raise FErr("trailing bytes")
    for key, (name, _, req, _, _) in schema.items():
        if req and key not in fields:
            raise FErr("missing field %s" % name)
    if ftype == 6 and (fields.get(2, 0) & 2) and 3 not in fields:
        raise FErr("missing field publish_id")
    return ftype, fields


# ---------------------------------------------------------------- canonical encoder
def _enc_head(mt, v):
    if v < 24:
        return bytes([mt << 5 | v])
    for ai, n in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if v < (1 << (8 * n)):
            return bytes([mt << 5 | ai]) + v.to_bytes(n, "big")


def _enc_item(want, v):
    if want == "uint":
        return _enc_head(0, v)
    if want == "bytes":
        return _enc_head(2, len(v)) + v
    if want == "text":
        return _enc_head(3, len(v)) + v
    if want == "bool":
        return b"\xf5" if v else b"\xf4"
    if want == "array":
        out = _enc_head(4, len(v))
        for k, x in v:
            out += _enc_item(k, x)
        return out
    raise ValueError(want)


def encode_frame(ftype, fields):
    schema = SCHEMA[ftype][1]
    parts = [(0, _enc_head(0, ftype))]
    for key in sorted(schema):
        name, (want, _), req, always, default = schema[key]
        if key in fields:
            v = fields[key]
        elif always:
            v = default
        else:
            continue
        parts.append((key, _enc_item(want, v)))
    return _enc_head(5, len(parts)) + b"".join(_enc_head(0, k) + x for k, x in parts)


def split_stream(stream, max_frame):
    frames = []
    i = 0
    while i < len(stream):
        if i + 4 > len(stream):
            raise FErr("truncated stream")
        ln = struct.unpack(">I", stream[i:i + 4])[0]
        if ln == 0:
            raise FErr("zero length prefix: truncated")
        if ln > max_frame or ln > ABS_MAX:
            raise FErr("frame of %d bytes exceeds the limit" % ln)
        i += 4
        if i + ln > len(stream):
            raise FErr("truncated stream")
        frames.append(stream[i:i + ln])
        i += ln
    return frames


def run_vector(v):
    stream = bytes.fromhex(v["stream"])
    try:
        out = []
        for fb in split_stream(stream, v["max_frame"]):
            t, f = decode_frame(fb)
            out.append((t, f, fb))
    except w.WError as e:
        if v["expect"] == "error":
            r = v.get("reason")
            return True, ([] if not r or r in str(e) else ["reason differs: expected %r, mine %r" % (r, str(e))])
        return False, ["refused: %s" % e]
    if v["expect"] == "error":
        return False, ["accepted but must fail"]
    msgs = []
    if len(out) != len(v["expect"]):
        return False, ["frame count differs"]
    for (t, f, fb), e in zip(out, v["expect"]):
        if SCHEMA[t][0] != e["type"] or fb.hex() != e["cbor"]:
            msgs.append("frame %s differs" % e["type"])
        re = encode_frame(t, {k: x for k, x in f.items() if k != 0 and x is not None})
        if re != fb:
            msgs.append("re-encoding of %s differs: %s" % (e["type"], re.hex()))
    return not msgs, msgs
