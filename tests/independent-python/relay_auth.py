"""Relay accounts (§3.3.14, §3.3.15, §3.5.6) and relay names."""
import re

import whispeer as w
import ed25519 as ed
import frames

DEFAULT_PORTS = {"ws": 80, "wss": 443, "tcp": 7481}


def _ipv6_parse(s):
    # minimal RFC 4291 text parser incl. embedded IPv4 (the WHATWG parser accepts it)
    if s.count("::") > 1:
        raise w.WError("bad ipv6")
    def groups(part):
        if not part:
            return []
        out = []
        items = part.split(":")
        for j, g in enumerate(items):
            if "." in g and j == len(items) - 1:
                o = [int(x) for x in g.split(".")]
                if len(o) != 4 or any(x > 255 for x in o):
                    raise w.WError("bad ipv4 in ipv6")
                out += [o[0] << 8 | o[1], o[2] << 8 | o[3]]
            else:
                if not 1 <= len(g) <= 4:
                    raise w.WError("bad ipv6 group")
                out.append(int(g, 16))
        return out
    if "::" in s:
        a, b = s.split("::")
        ga, gb = groups(a), groups(b)
        if len(ga) + len(gb) > 7:
            raise w.WError("bad ipv6")
        return ga + [0] * (8 - len(ga) - len(gb)) + gb
    g = groups(s)
    if len(g) != 8:
        raise w.WError("bad ipv6")
    return g


def _ipv6_serialize(g):
    # WHATWG: compress the first longest run of >= 2 zero groups
    best, bl = -1, 1
    i = 0
    while i < 8:
        if g[i] == 0:
            j = i
            while j < 8 and g[j] == 0:
                j += 1
            if j - i > bl:
                best, bl = i, j - i
            i = j
        else:
            i += 1
    out = ""
    i = 0
    while i < 8:
        if i == best:
            out += "::"
            i += bl
            continue
        if out and not out.endswith(":"):
            out += ":"
        out += "%x" % g[i]
        i += 1
    return "[" + out + "]"


def _ipv4_number(p):
    if p == "":
        raise ValueError
    if p[:2].lower() == "0x":
        return int(p[2:] or "0", 16)
    if len(p) > 1 and p[0] == "0":
        return int(p[1:], 8)
    return int(p, 10)


def _ends_in_number(h):
    parts = h.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    last = parts[-1]
    if last and all(c.isdigit() for c in last):
        return True
    try:
        _ipv4_number(last)
        return True
    except ValueError:
        return False


def _ipv4_parse(h):
    parts = h.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if len(parts) > 4:
        raise w.WError("bad ipv4")
    nums = [_ipv4_number(p) for p in parts]
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise w.WError("bad ipv4")
    v = nums[-1]
    for k, n in enumerate(nums[:-1]):
        v += n * 256 ** (3 - k)
    return ".".join(str((v >> s) & 255) for s in (24, 16, 8, 0))


def whatwg_host(h):
    import idna
    if h.startswith("["):
        if not h.endswith("]"):
            raise w.WError("bad ipv6")
        return _ipv6_serialize(_ipv6_parse(h[1:-1]))
    from urllib.parse import unquote
    h = unquote(h)
    ascii_ = idna.encode(h, uts46=True, transitional=False).decode() if any(ord(c) > 127 for c in h) else h.lower()
    if _ends_in_number(ascii_):
        return _ipv4_parse(ascii_)
    return ascii_


def relay_name_of_url(url):
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://([^/?#]*)", url)
    scheme, auth = m.group(1).lower(), m.group(2)
    auth = auth.rsplit("@", 1)[-1]
    if auth.startswith("["):
        k = auth.index("]")
        host, rest = auth[:k + 1], auth[k + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in auth:
        host, port = auth.rsplit(":", 1)
    else:
        host, port = auth, ""
    if port:
        p = int(port)
    elif scheme in DEFAULT_PORTS:
        p = DEFAULT_PORTS[scheme]
    else:
        raise w.WError("scheme %s needs a port" % scheme)
    return "%s:%d" % (whatwg_host(host), p)


def canonical_entry(e):
    if e.startswith("["):
        k = e.index("]")
        host, rest = e[:k + 1], e[k + 1:]
        port = rest[1:] if rest.startswith(":") else None
    elif ":" in e:
        host, port = e.rsplit(":", 1)
    else:
        host, port = e, None
    if any(ord(c) > 127 for c in host):
        raise w.WError("non-ASCII host entry")
    if not host.startswith("[") and _ends_in_number(host) and not re.fullmatch(r"\d+\.\d+\.\d+\.\d+", host):
        raise w.WError("host ends in a number without being dotted decimal")
    h = whatwg_host(host)
    if port is not None:
        if not re.fullmatch(r"0|[1-9]\d*", port):
            raise w.WError("bad port")
        return "%s:%s" % (h, port)
    return h


def name_matches(name, entries):
    for e in entries:
        if name == e:
            return True
        if ":" in name:
            host, port = name.rsplit(":", 1)
            if re.fullmatch(r"0|[1-9]\d*", port) and host == e:
                return True
    return False


LEGACY = b"whispeer/v2/relay-auth\0"
BOUND = b"whispeer/v2/relay-auth-bound\0"


def judge_auth(challenge_b, auth_b, account, names):
    ct, cf = frames.decode_frame(challenge_b)
    at, af = frames.decode_frame(auth_b)
    if ct != 16 or at != 17:
        raise w.WError("wrong frames")
    nonce = cf[1]
    relay = af.get(2)
    names = [canonical_entry(n) for n in names]
    if names:
        if relay is None:
            raise w.WError("this relay takes only relay-bound sign-ins and the Auth names no relay")
        if not name_matches(relay.decode(), names):
            raise w.WError("the Auth is bound to a name that is not this relay's: %r" % relay)
    if relay is None:
        si = LEGACY + nonce + account
    else:
        si = BOUND + nonce + account + bytes([len(relay)]) + relay
    if not ed.verify_strict(account, si, af[1]):
        raise w.WError("bad signature")
    return si, (relay.decode() if relay is not None else None)


def run_vector(v):
    account = bytes.fromhex(v["account"])
    msgs = []
    if ed.public_key(bytes.fromhex(v["account_seed"])) != account:
        msgs.append("account key does not match seed")
    try:
        si, relay = judge_auth(bytes.fromhex(v["challenge"]), bytes.fromhex(v["auth"]), account, v["relay_names"])
    except w.WError as e:
        if v["expect"] == "error":
            r = v.get("reason")
            return True, msgs + ([] if not r or r in str(e) else ["reason differs: expected %r, mine %r" % (r, str(e))])
        return False, ["refused: %s" % e]
    if v["expect"] == "error":
        return False, ["accepted but must fail"]
    if si.hex() != v["expect"]["sig_input"] or relay != v["expect"]["relay"]:
        return False, msgs + ["sig_input/relay differ"]
    return not msgs, msgs


def run_names_vector(v):
    msgs = []
    for u in v["urls"]:
        got = relay_name_of_url(u["url"])
        if got != u["name"]:
            msgs.append("url %s: expected %s got %s" % (u["url"], u["name"], got))
        if "host" in u:
            g2 = "%s:%d" % (whatwg_host(u["host"]), u["port"])
            if g2 != u["name"]:
                msgs.append("host/port %s: got %s" % (u["host"], g2))
    for e in v["entries"]:
        got = canonical_entry(e["entry"])
        if got != e["canonical"]:
            msgs.append("entry %s: expected %s got %s" % (e["entry"], e["canonical"], got))
    for m in v["matching"]:
        got = name_matches(m["name"], [canonical_entry(x) for x in m["names"]])
        if got != m["matches"]:
            msgs.append("match %s in %s: expected %s" % (m["name"], m["names"], m["matches"]))
    return not msgs, msgs
