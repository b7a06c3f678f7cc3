"""Independent Python implementation of whispeer protocol v2, from docs/PROTOCOL.md only."""
import struct
import unicodedata
import blake3 as _b3
import ed25519 as ed

U64MAX = 2**64 - 1
CAP = 16 * 1024 * 1024


class WError(Exception):
    pass


class MissingDictionary(WError):
    def __init__(self, dict_id):
        super().__init__("needs zstd dictionary " + dict_id.hex())
        self.dict_id = dict_id


# ---------------------------------------------------------------- primitives (§1.2)
def kh(k, x):
    return _b3.blake3(x, key=k).digest()


def xof(k, x, n):
    return _b3.blake3(x, key=k).digest(length=n)


def derive_key(ctx, x):
    return _b3.blake3(x, derive_key_context=ctx).digest()


def H(x):
    return _b3.blake3(x).digest()


def u16(x):
    return struct.pack(">H", x)


def u32(x):
    return struct.pack(">I", x)


def u64(x):
    return struct.pack(">Q", x)


def lp(x):
    assert len(x) <= 0xFFFF
    return u16(len(x)) + x


W = b"wsp1"


# ---------------------------------------------------------------- bech32m (§6.1)
CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
BECH32M_CONST = 0x2BC830A3
LIMITS = {"wsdict": 200_000, "wsinv": 1_048_576}


def _polymod(values):
    GEN = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for v in values:
        b = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= GEN[i] if ((b >> i) & 1) else 0
    return chk


def _hrp_expand(hrp):
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def bech32m_encode(hrp, data):
    acc, bits, out = 0, 0, []
    for b in data:
        acc = (acc << 8) | b
        bits += 8
        while bits >= 5:
            bits -= 5
            out.append((acc >> bits) & 31)
    if bits:
        out.append((acc << (5 - bits)) & 31)
    pm = _polymod(_hrp_expand(hrp) + out + [0] * 6) ^ BECH32M_CONST
    chk = [(pm >> 5 * (5 - i)) & 31 for i in range(6)]
    s = hrp + "1" + "".join(CHARSET[d] for d in out + chk)
    if len(s) > LIMITS.get(hrp, 4096):
        raise WError("string too long")
    return s


def bech32m_decode(s, expected_hrp):
    s = s.strip()
    if s.lower() != s and s.upper() != s:
        raise WError("mixed case")
    s = s.lower()
    if len(s) > LIMITS.get(expected_hrp, 4096):
        raise WError("invalid string: too long")
    pos = s.rfind("1")
    if pos < 1 or pos + 7 > len(s):
        raise WError("invalid string")
    hrp, datap = s[:pos], s[pos + 1:]
    if any(ord(c) < 33 or ord(c) > 126 for c in hrp):
        raise WError("invalid hrp")
    try:
        vals = [CHARSET.index(c) for c in datap]
    except ValueError:
        raise WError("invalid character")
    if _polymod(_hrp_expand(hrp) + vals) != BECH32M_CONST:
        raise WError("bad checksum")
    if hrp != expected_hrp:
        raise WError("wrong kind: expected %s, found %s" % (expected_hrp, hrp))
    acc, bits, out = 0, 0, bytearray()
    for v in vals[:-6]:
        acc = (acc << 5) | v
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    # reference does not check padding bits (§6.1)
    return bytes(out)


# ---------------------------------------------------------------- topics (§8)
def check_topic(t, is_filter=False):
    b = t.encode("utf-8")
    if not b:
        raise WError("empty topic")
    if len(b) > 1024:
        raise WError("topic too long")
    levels = t.split("/")
    if len(levels) > 32:
        raise WError("too many levels")
    for lv in levels:
        if lv == "":
            raise WError("empty level")
        if len(lv.encode()) > 255:
            raise WError("level too long")
        if "\0" in lv:
            raise WError("NUL")
    if not unicodedata.is_normalized("NFC", t):
        raise WError("not NFC")
    for i, lv in enumerate(levels):
        if "+" in lv or "#" in lv:
            if not is_filter:
                raise WError("wildcard in topic")
            if lv not in ("+", "#"):
                raise WError("partial wildcard")
            if lv == "#" and i != len(levels) - 1:
                raise WError("# not last")
    return levels


# ---------------------------------------------------------------- key schedule (§5)
def epoch_base(root, tree_id, epoch):
    return kh(root, W + b"\x01" + tree_id + u64(epoch))


def routing_key(B):
    return kh(B, W + b"\x02")


def name_key(B):
    return kh(B, W + b"\x03")


def subtree_root(B):
    return kh(B, W + b"\x04")


def descend(S, segs):
    for s in segs:
        S = kh(S, W + b"\x05" + lp(s.encode()))
    return S


def msg_key(S_t):
    return kh(S_t, W + b"\x06")


def token(R, i, s):
    return xof(R, W + b"\x07" + u16(i) + lp(s.encode()), 16)


def key_id_of(R, tree_id, epoch):
    return xof(R, W + b"\x08" + tree_id + u64(epoch), 16)


def commitment(k):
    return kh(k, W + b"\x0c")


def suffix(suite):
    return b"" if suite == 1 else bytes([suite])


def body_key_commit(M, nonce, suite):
    x = xof(M, W + b"\x0a" + nonce + suffix(suite), 64)
    return x[:32], x[32:]


def sealed_name_key(N, nonce, suite):
    return xof(N, W + b"\x0b" + nonce + suffix(suite), 32)


def padme(L):
    if L < 2:
        return L
    E = L.bit_length() - 1
    Wd = E.bit_length()
    z = E - Wd
    mask = (1 << z) - 1
    return (L + mask) & ~mask


# ---------------------------------------------------------------- scopes (§5.6)
class Scope:
    TREE, SUBTREE, TOPIC = 0, 1, 2

    def __init__(self, kind, path=""):
        self.kind, self.path = kind, path

    @staticmethod
    def parse(text):
        if text == "#":
            return Scope(0, "")
        if text.endswith("/#"):
            return Scope(1, text[:-2])
        return Scope(2, text)

    def text(self):
        return ["#", self.path + "/#", self.path][self.kind]

    def levels(self):
        return [] if self.kind == 0 else self.path.split("/")

    def __eq__(self, o):
        return self.kind == o.kind and self.path == o.path

    def __hash__(self):
        return hash((self.kind, self.path))

    def covers_topic(self, t):
        if self.kind == 0:
            return True
        if self.kind == 1:
            return t == self.path or t.startswith(self.path + "/")
        return t == self.path

    def contains(self, o):
        """non-strict containment of scope o in self"""
        if self.kind == 0:
            return True
        if self.kind == 1:
            return o.kind in (1, 2) and self.covers_topic(o.path)
        return o.kind == 2 and o.path == self.path

    def specificity(self):
        return [0, 2 * len(self.levels()), 2 * len(self.levels()) + 1][self.kind]


def derive_scope_key(scope, key, target):
    """key of `target` (contained in scope) from a grant (scope, key)."""
    assert scope.contains(target)
    if scope.kind == 2:
        return key
    skip = len(scope.levels())
    S = descend(key, target.levels()[skip:])
    return msg_key(S) if target.kind == 2 else S


def derive_topic_key(scope, key, topic):
    if not scope.covers_topic(topic):
        return None
    return derive_scope_key(scope, key, Scope(2, topic))


# ---------------------------------------------------------------- certificates, grants (§5.7, §6.3)
class Cert:
    def __init__(self, tree_id, epoch, flags, name, admin_pk, R, N, prev_cutoff, not_after, sig=None):
        self.tree_id, self.epoch, self.flags, self.name = tree_id, epoch, flags, name
        self.admin_pk, self.R, self.N = admin_pk, R, N
        self.prev_cutoff, self.not_after, self.sig = prev_cutoff, not_after, sig

    def fields(self):
        return (self.tree_id + u64(self.epoch) + bytes([self.flags]) + lp(self.name) + self.admin_pk
                + self.R + self.N + u64(self.prev_cutoff) + u64(self.not_after))

    def signed_bytes(self):
        return b"whispeer/v2/epoch-cert\0" + self.fields()

    def key_id(self):
        return key_id_of(self.R, self.tree_id, self.epoch)

    def passphrase(self):
        return bool(self.flags & 1)

    def check(self):
        if self.flags & ~1:
            raise WError("unknown certificate flags")
        if len(self.name) > 128:
            raise WError("tree name too long")
        try:
            self.name.decode("utf-8")
        except UnicodeDecodeError:
            raise WError("tree name not UTF-8")
        if not ed.is_point(self.admin_pk):
            raise WError("admin_pk not a point")
        if not ed.verify_strict(self.admin_pk, self.signed_bytes(), self.sig):
            raise WError("bad signature on epoch certificate")
        if self.passphrase() and self.epoch > 0:
            raise WError("epoch %d of a passphrase tree" % self.epoch)
        if self.passphrase() and self.not_after != U64MAX:
            raise WError("invalid string: a passphrase tree has no end")
        if self.epoch == 0 and self.prev_cutoff != 0:
            raise WError("non-zero cutoff at epoch 0")


class Grant:
    def __init__(self, cert, scope, key, auth_kind, admin_sig=None, parent=None, narrower_pk=None,
                 narrower_sig=None):
        self.cert, self.scope, self.key, self.auth_kind = cert, scope, key, auth_kind
        self.admin_sig, self.parent = admin_sig, parent
        self.narrower_pk, self.narrower_sig = narrower_pk, narrower_sig

    def grant_fields(self):
        c = self.cert
        return (c.tree_id + u64(c.epoch) + bytes([self.scope.kind]) + lp(self.scope.path.encode())
                + commitment(self.key))

    def admin_signed_bytes(self):
        return b"whispeer/v2/grant\0" + self.grant_fields()

    def narrow_signed_bytes(self):
        return (b"whispeer/v2/grant-narrow\0" + self.grant_fields() + bytes([self.parent.kind])
                + lp(self.parent.path.encode()))

    def encode(self):
        c = self.cert
        out = (b"\x02" + c.fields() + c.sig + bytes([self.scope.kind]) + lp(self.scope.path.encode())
               + self.key + bytes([self.auth_kind]))
        if self.auth_kind == 1:
            out += self.admin_sig
        else:
            out += bytes([self.parent.kind]) + lp(self.parent.path.encode()) + self.narrower_pk + self.narrower_sig
        return out

    def string(self):
        return bech32m_encode("wskey", self.encode())


class Reader:
    def __init__(self, b):
        self.b, self.i = b, 0

    def take(self, n):
        if self.i + n > len(self.b):
            raise WError("truncated")
        r = self.b[self.i:self.i + n]
        self.i += n
        return r

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def lp(self):
        return self.take(self.u16())

    def rest(self):
        r = self.b[self.i:]
        self.i = len(self.b)
        return r

    def done(self):
        return self.i == len(self.b)


def _parse_scope(kind, path):
    if kind not in (0, 1, 2):
        raise WError("unknown scope kind")
    try:
        p = path.decode("utf-8")
    except UnicodeDecodeError:
        raise WError("scope path not UTF-8")
    if kind == 0:
        if p:
            raise WError("tree scope with a path")
    else:
        check_topic(p)
    return Scope(kind, p)


def parse_grant_bytes(b):
    r = Reader(b)
    fmt = r.u8()
    if fmt == 1:
        raise WError("old version: convert it with `whispeer key upgrade`")
    if fmt != 2:
        raise WError("unsupported version %d" % fmt)
    tree_id = r.take(16)
    epoch = r.u64()
    flags = r.u8()
    name = r.lp()
    admin_pk, R, N = r.take(32), r.take(32), r.take(32)
    prev_cutoff, not_after = r.u64(), r.u64()
    sig = r.take(64)
    cert = Cert(tree_id, epoch, flags, name, admin_pk, R, N, prev_cutoff, not_after, sig)
    kind = r.u8()
    path = r.lp()
    key = r.take(32)
    auth = r.u8()
    if auth == 1:
        asig = r.take(64)
        g = Grant(cert, None, key, 1, admin_sig=asig)
    elif auth == 2:
        pk_ = r.u8()
        ppath = r.lp()
        npk = r.take(32)
        nsig = r.take(64)
        g = Grant(cert, None, key, 2, parent=(pk_, ppath), narrower_pk=npk, narrower_sig=nsig)
    else:
        raise WError("unknown auth kind")
    if not r.done():
        raise WError("trailing bytes")
    # checks (§6.3 list), certificate first
    cert.check()
    g.scope = _parse_scope(kind, path)
    if auth == 1:
        if not ed.verify_strict(admin_pk, g.admin_signed_bytes(), g.admin_sig):
            raise WError("bad signature on grant (admin)")
    else:
        g.parent = _parse_scope(*g.parent)
        if not ed.is_point(g.narrower_pk):
            raise WError("narrower_pk not a point")
        if not (g.parent.contains(g.scope) and g.parent != g.scope):
            raise WError("parent scope does not strictly contain the scope")
        if not ed.verify_strict(g.narrower_pk, g.narrow_signed_bytes(), g.narrower_sig):
            raise WError("bad signature on grant (narrower)")
    g.raw = b
    return g


def parse_grant_string(s):
    return parse_grant_bytes(bech32m_decode(s, "wskey"))


class TreeKey:
    def __init__(self, tree_id, epoch, root, admin_seed, name, flags=0, prev_cutoff=0, not_after=U64MAX):
        self.tree_id, self.epoch, self.root, self.admin_seed = tree_id, epoch, root, admin_seed
        self.name, self.flags, self.prev_cutoff, self.not_after = name, flags, prev_cutoff, not_after
        self.B = epoch_base(root, tree_id, epoch)
        self.R, self.N, self.S0 = routing_key(self.B), name_key(self.B), subtree_root(self.B)
        self.admin_pk = ed.public_key(admin_seed)

    @staticmethod
    def parse(s):
        b = bech32m_decode(s, "wstree")
        r = Reader(b)
        fmt = r.u8()
        if fmt != 2:
            raise WError("unsupported tree key version %d" % fmt)
        flags = r.u8()
        tree_id = r.take(16)
        epoch = r.u64()
        root = r.take(32)
        seed = r.take(32)
        name = r.lp()
        pc, na = r.u64(), r.u64()
        if not r.done():
            raise WError("trailing bytes")
        if flags & ~1:
            raise WError("unknown flags")
        if len(name) > 128:
            raise WError("tree name too long")
        name.decode("utf-8")
        tk = TreeKey(tree_id, epoch, root, seed, name, flags, pc, na)
        tk.cert().check()
        return tk

    def encode(self):
        return (b"\x02" + bytes([self.flags]) + self.tree_id + u64(self.epoch) + self.root + self.admin_seed
                + lp(self.name) + u64(self.prev_cutoff) + u64(self.not_after))

    def string(self):
        return bech32m_encode("wstree", self.encode())

    def key_id(self):
        return key_id_of(self.R, self.tree_id, self.epoch)

    def cert(self):
        c = Cert(self.tree_id, self.epoch, self.flags, self.name, self.admin_pk, self.R, self.N,
                 self.prev_cutoff, self.not_after)
        c.sig = ed.sign(self.admin_seed, c.signed_bytes())
        return c

    def grant(self, scope):
        key = derive_scope_key(Scope(0), self.S0, scope) if scope.kind else self.S0
        g = Grant(self.cert(), scope, key, 1)
        g.admin_sig = ed.sign(self.admin_seed, g.admin_signed_bytes())
        g.raw = g.encode()
        return g


def wspk(pk):
    return bech32m_encode("wspk", pk)


def parse_wssec(s):
    b = bech32m_decode(s, "wssec")
    if len(b) != 65 or b[0] != 1:
        raise WError("bad wssec")
    return b[1:33], b[33:65]


# ---------------------------------------------------------------- passphrase trees (§5.9)
def passphrase_tree(tree_name, passphrase, realm=b"", m_kib=262144, t=2, p=1):
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    if realm:
        tree_id = derive_key("whispeer v2 realm tree id", lp(realm) + tree_name)[:16]
    else:
        tree_id = derive_key("whispeer v1 tree id", tree_name)[:16]
    salt_in = tree_id + lp(tree_name) + (lp(realm) if realm else b"")
    salt = derive_key("whispeer v1 passphrase salt", salt_in)
    out = Argon2id(salt=salt, length=64, iterations=t, lanes=p, memory_cost=m_kib).derive(passphrase)
    return TreeKey(tree_id, 0, out[:32], out[32:], tree_name, flags=1, prev_cutoff=0, not_after=U64MAX)


# ---------------------------------------------------------------- dictionaries (§4.6.1, §6.4)
ZSTD_DICT_MAGIC = bytes.fromhex("37a430ec")
ZSTD_FRAME_MAGIC = bytes.fromhex("28b52ffd")


def dict_id_of(D):
    return derive_key("whispeer v2 zstd dictionary id", D)[:16]


class Dictionary:
    def __init__(self, D):
        import zstandard as zs
        if len(D) < 8:
            raise WError("dictionary too short")
        if len(D) > 114688:
            raise WError("dictionary too large")
        self.D = D
        self.id = dict_id_of(D)
        self.zstd_format = D[:4] == ZSTD_DICT_MAGIC
        dt = zs.DICT_TYPE_FULLDICT if self.zstd_format else zs.DICT_TYPE_RAWCONTENT
        self.zd = zs.ZstdCompressionDict(D, dict_type=dt)
        if self.zstd_format:
            # importer check: compress and decompress a short input (§4.6.1)
            try:
                probe = b"whispeer dictionary probe"
                c = zs.ZstdCompressor(level=3, dict_data=self.zd, write_dict_id=False).compress(probe)
                if zs.ZstdDecompressor(dict_data=self.zd).decompress(c) != probe:
                    raise WError("dictionary cannot be loaded")
            except zs.ZstdError as e:
                raise WError("zstd cannot load the dictionary: %s" % e)

    @staticmethod
    def parse_bytes(b):
        if len(b) < 17:
            raise WError("dictionary string too short")
        if b[0] != 1:
            raise WError("unsupported format version %d" % b[0])
        d = Dictionary(b[17:])
        if d.id != b[1:17]:
            raise WError("dictionary id does not match its bytes")
        return d

    @staticmethod
    def parse(s):
        return Dictionary.parse_bytes(bech32m_decode(s, "wsdict"))

    def string(self):
        return bech32m_encode("wsdict", b"\x01" + self.id + self.D)


# ---------------------------------------------------------------- compression (§4.6)
def zstd_frame_content_size(F):
    """Read Frame_Content_Size from a zstd frame header (RFC 8878 §3.1.1.1) without decompressing."""
    if len(F) < 5 or F[:4] != ZSTD_FRAME_MAGIC:
        raise WError("not a zstd frame")
    fhd = F[4]
    fcs_flag = fhd >> 6
    single = (fhd >> 5) & 1
    if (fhd >> 3) & 1:
        raise WError("zstd reserved bit")
    did_flag = fhd & 3
    pos = 5 + (0 if single else 1)
    pos += [0, 1, 2, 4][did_flag]
    fcs_size = [1 if single else 0, 2, 4, 8][fcs_flag]
    if fcs_size == 0:
        raise WError("zstd frame without content size")
    if len(F) < pos + fcs_size:
        raise WError("zstd frame header truncated")
    v = int.from_bytes(F[pos:pos + fcs_size], "little")
    if fcs_size == 2:
        v += 256
    return v, did_flag


def zstd_decompress_exact(F, size, zd=None):
    import zstandard as zs
    dctx = zs.ZstdDecompressor(dict_data=zd) if zd is not None else zs.ZstdDecompressor()
    try:
        dobj = dctx.decompressobj()
        out = dobj.decompress(F)
        if not dobj.eof:
            raise WError("zstd frame truncated: does not decompress")
        if dobj.unused_data:
            raise WError("trailing bytes after zstd frame")
    except zs.ZstdError as e:
        raise WError("does not decompress: %s" % e)
    if len(out) != size:
        raise WError("does not decompress: size differs")
    return out


def lz4_block_decompress(B, U):
    out = bytearray()
    i, n = 0, len(B)
    if n == 0:
        if U == 0:
            return b""
        raise WError("does not decompress: empty block")
    while True:
        if i >= n:
            raise WError("does not decompress: truncated")
        tok = B[i]
        i += 1
        ll = tok >> 4
        if ll == 15:
            while True:
                if i >= n:
                    raise WError("does not decompress: truncated")
                x = B[i]
                i += 1
                ll += x
                if x != 255:
                    break
        if i + ll > n:
            raise WError("does not decompress: literals past end")
        if len(out) + ll > U:
            raise WError("does not decompress: output past declared size")
        out += B[i:i + ll]
        i += ll
        if i == n:
            break  # last sequence: literals only
        if i + 2 > n:
            raise WError("does not decompress: truncated offset")
        off = B[i] | (B[i + 1] << 8)
        i += 2
        if off == 0 or off > len(out):
            raise WError("does not decompress: bad offset")
        ml = tok & 15
        if ml == 15:
            while True:
                if i >= n:
                    raise WError("does not decompress: truncated")
                x = B[i]
                i += 1
                ml += x
                if x != 255:
                    break
        ml += 4
        if len(out) + ml > U:
            raise WError("does not decompress: output past declared size")
        start = len(out) - off
        for k in range(ml):
            out.append(out[start + k])
    if len(out) != U:
        raise WError("does not decompress: decodes to fewer bytes than declared")
    return bytes(out)


def decompress(codec, payload, dicts_for_tree, cap=CAP):
    if codec == 0:
        if len(payload) > cap:
            raise WError("exceeds the decompression cap")
        return payload
    if codec == 1:
        size, _ = zstd_frame_content_size(payload)
        if size > cap:
            raise WError("exceeds the decompression cap")
        return zstd_decompress_exact(payload, size)
    if codec == 2:
        if len(payload) < 4:
            raise WError("does not decompress: no size prefix")
        U = struct.unpack(">I", payload[:4])[0]
        if U > cap:
            raise WError("exceeds the decompression cap")
        return lz4_block_decompress(payload[4:], U)
    if codec == 3:
        if len(payload) < 16:
            raise WError("does not decompress: payload shorter than the dictionary id")
        did = payload[:16]
        d = dicts_for_tree.get(did)
        if d is None:
            raise MissingDictionary(did)
        F = payload[16:]
        if F[:4] == ZSTD_FRAME_MAGIC and len(F) > 4 and (F[4] & 3):
            raise WError("frame has a dictionary id")
        size, _ = zstd_frame_content_size(F)
        if size > cap:
            raise WError("exceeds the decompression cap")
        return zstd_decompress_exact(F, size, d.zd)
    raise WError("unsupported codec %d" % codec)


def compress(spec, data, dicts=None):
    """returns (codec, stored) following the reference sender rule (fallback to codec 0)."""
    import zstandard as zs
    if spec == "none":
        return 0, data
    if spec.startswith("zstd-dict:"):
        parts = spec.split(":")
        did = bytes.fromhex(parts[1])
        level = int(parts[2]) if len(parts) > 2 else 3
        d = dicts[did]
        F = zs.ZstdCompressor(level=level, dict_data=d.zd, write_dict_id=False, write_content_size=True,
                              write_checksum=False).compress(data)
        c = did + F
        return (3, c) if len(c) < len(data) else (0, data)
    if spec.startswith("zstd"):
        level = int(spec.split(":")[1]) if ":" in spec else 3
        c = zs.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)
        return (1, c) if len(c) < len(data) else (0, data)
    if spec == "lz4":
        import lz4.block
        c = u32(len(data)) + lz4.block.compress(data, store_size=False)
        return (2, c) if len(c) < len(data) else (0, data)
    raise ValueError(spec)


# ---------------------------------------------------------------- AEADs (§1.3, §4.3)
def aead_seal(suite, key, nonce, pt, ad):
    if suite == 1:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as enc
        return enc(pt, ad, nonce, key)
    if suite == 3:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        return AESGCM(key).encrypt(nonce[:12], pt, ad)
    raise WError("suite")


def aead_open(suite, key, nonce, ct, ad):
    try:
        if suite == 1:
            from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as dec
            return dec(ct, ad, nonce, key)
        if suite == 3:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            return AESGCM(key).decrypt(nonce[:12], ct, ad)
    except Exception:
        raise WError("AEAD open failed")
    raise WError("suite")


# ---------------------------------------------------------------- envelope header (§4.1, §4.2)
class Header:
    pass


def parse_envelope(env):
    if len(env) < 76:
        raise WError("envelope too short")
    if env[0] != 2:
        raise WError("unsupported envelope version %d" % env[0])
    if env[1] not in (1, 3):
        raise WError("unsupported cipher suite %d" % env[1])
    n = env[75]
    if n == 0 or n > 32:
        raise WError("bad token count")
    if len(env) < 78 + 16 * n:
        raise WError("envelope too short for tokens")
    S = struct.unpack(">H", env[76 + 16 * n:78 + 16 * n])[0]
    if S > 1072:
        raise WError("sealed name too long")
    if S < 48 or (S - 16) % 32:
        raise WError("bad sealed name length")
    if len(env) < 78 + 16 * n + S + 16:
        raise WError("envelope too short for body")
    h = Header()
    h.version, h.suite, h.flags = env[0], env[1], env[2]
    h.key_id, h.nonce, h.commit = env[3:19], env[19:43], env[43:75]
    h.n = n
    h.tokens = [env[76 + 16 * i:92 + 16 * i] for i in range(n)]
    h.S = S
    h.name_ad = env[:78 + 16 * n]
    h.sealed_name = env[78 + 16 * n:78 + 16 * n + S]
    h.header = env[:78 + 16 * n + S]
    h.ciphertext = env[78 + 16 * n + S:]
    return h


# ---------------------------------------------------------------- body (§4.5, §4.8, §4.14)
MSG_SIG_CTX = b"whispeer/v2/msg-sig\0"
BATCH_SIG_CTX = b"whispeer/v2/batch-sig\0"


def sig_input(tree_id, epoch, topic, msg_id, ts_ms, content_type, codec, pad_scheme, payload):
    return (MSG_SIG_CTX + tree_id + u64(epoch) + lp(topic.encode()) + msg_id + u64(ts_ms)
            + lp(content_type) + bytes([codec, pad_scheme]) + H(payload))


def batch_depth_sides(index, count):
    """sides from the top: list of bools (True = right)"""
    sides = []
    i, n = index, count
    while n > 1:
        k = 1 << ((n - 1).bit_length() - 1)
        if i < k:
            sides.append(False)
            n = k
        else:
            sides.append(True)
            i -= k
            n -= k
    return sides


def leaf_hash(salt, m):
    return H(b"\x00" + salt + m)


def node_hash(l, r):
    return H(b"\x01" + l + r)


def merkle_root_from_path(leaf, index, count, path):
    sides = batch_depth_sides(index, count)
    depth = len(sides)
    assert len(path) == depth
    h = leaf
    for j in range(depth):
        right = sides[depth - 1 - j]
        h = node_hash(path[j], h) if right else node_hash(h, path[j])
    return h


def mth(leaves):
    n = len(leaves)
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def merkle_path(leaves, index):
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if index < k:
        return merkle_path(leaves[:k], index) + [mth(leaves[k:])]
    return merkle_path(leaves[k:], index - k) + [mth(leaves[:k])]


def batch_signed_bytes(tree_id, epoch, count, root):
    return BATCH_SIG_CTX + tree_id + u64(epoch) + u32(count) + root


class Body:
    pass


def parse_body(pt):
    r = Reader(pt)
    b = Body()
    try:
        b.sig_scheme = r.u8()
        if b.sig_scheme not in (0, 1, 2):
            raise WError("unsupported signature scheme %d" % b.sig_scheme)
        b.sender_pk = None
        if b.sig_scheme in (1, 2):
            b.sender_pk = r.take(32)
            if not ed.is_point(b.sender_pk):
                raise WError("sender key is not a point")
            b.sig = r.take(64)
        if b.sig_scheme == 2:
            b.count = r.u32()
            b.index = r.u32()
            if not 1 <= b.count <= 4096:
                raise WError("batch count %d" % b.count)
            if not b.index < b.count:
                raise WError("batch index %d not below count %d" % (b.index, b.count))
            b.salt = r.take(32)
            pl = r.u8()
            depth = len(batch_depth_sides(b.index, b.count))
            if pl != depth:
                raise WError("batch path length %d, expected %d" % (pl, depth))
            b.path = [r.take(32) for _ in range(pl)]
        b.msg_id = r.take(16)
        b.ts_ms = r.u64()
        ct_len = r.u16()
        if ct_len > 255:
            raise WError("content type too long")
        ct = r.take(ct_len)
        try:
            ct.decode("utf-8")
        except UnicodeDecodeError:
            raise WError("content type not UTF-8")
        b.content_type = ct
        b.codec = r.u8()
        b.pad_scheme = r.u8()
        plen = r.u32()
        b.payload = r.take(plen)
    except WError as e:
        if str(e) == "truncated":
            raise WError("body truncated")
        raise
    L = r.i
    if b.pad_scheme == 0:
        if len(pt) != L:
            raise WError("bytes after the payload without padding")
    elif b.pad_scheme == 1:
        if len(pt) != padme(L):
            raise WError("padded length is not padme(L)")
        if any(pt[L:]):
            raise WError("padding not zero")
    else:
        raise WError("unsupported padding scheme %d" % b.pad_scheme)
    if b.codec not in (0, 1, 2, 3):
        raise WError("unsupported codec %d" % b.codec)
    return b


def build_body(sig_scheme, msg_id, ts_ms, content_type, codec, pad_scheme, payload, sender_pk=None, sig=None,
               batch=None):
    out = bytes([sig_scheme])
    if sig_scheme == 1:
        out += sender_pk + sig
    elif sig_scheme == 2:
        count, index, salt, path = batch
        out += sender_pk + sig + u32(count) + u32(index) + salt + bytes([len(path)]) + b"".join(path)
    out += msg_id + u64(ts_ms) + lp(content_type) + bytes([codec, pad_scheme]) + u32(len(payload)) + payload
    if pad_scheme == 1:
        out += b"\0" * (padme(len(out)) - len(out))
    return out


def verify_body_sig(b, tree_id, epoch, topic, roots_cache=None):
    m = sig_input(tree_id, epoch, topic, b.msg_id, b.ts_ms, b.content_type, b.codec, b.pad_scheme, b.payload)
    if b.sig_scheme == 1:
        if not ed.verify_strict(b.sender_pk, m, b.sig):
            raise WError("signature does not verify")
    elif b.sig_scheme == 2:
        root = merkle_root_from_path(leaf_hash(b.salt, m), b.index, b.count, b.path)
        k = (b.sender_pk, tree_id, epoch, b.count, root, b.sig)
        if roots_cache is not None and k in roots_cache:
            return
        if not ed.verify_strict(b.sender_pk, batch_signed_bytes(tree_id, epoch, b.count, root), b.sig):
            raise WError("signature does not verify")
        if roots_cache is not None:
            roots_cache.add(k)


# ---------------------------------------------------------------- sealing (§4.9)
def seal(*, suite, key_id, R, N, M, topic, nonce, body_plain):
    levels = check_topic(topic)
    tokens = b"".join(token(R, i, s) for i, s in enumerate(levels))
    tb = topic.encode()
    P = -(-(2 + len(tb)) // 32) * 32
    name_pt = u16(len(tb)) + tb + b"\0" * (P - 2 - len(tb))
    S = P + 16
    bk, commit = body_key_commit(M, nonce, suite)
    prefix = b"\x02" + bytes([suite]) + b"\x00" + key_id + nonce + commit + bytes([len(levels)]) + tokens + u16(S)
    sealed_name = aead_seal(suite, sealed_name_key(N, nonce, suite), nonce, name_pt, prefix)
    header = prefix + sealed_name
    return header + aead_seal(suite, bk, nonce, body_plain, header)


# ---------------------------------------------------------------- keyring (§5.8)
class HeldGrant:
    def __init__(self, g, prov):
        self.g, self.prov = g, prov  # prov: ('admin',), ('derived', scope), ('delegated', pk)

    def prov_text(self):
        if self.prov[0] == "admin":
            return "admin-signed"
        if self.prov[0] == "derived":
            return "derived from '%s'" % self.prov[1].text()
        return "delegated by " + wspk(self.prov[1])

    def verified(self):
        return self.prov[0] in ("admin", "derived")


class EpochState:
    def __init__(self, cert):
        self.cert = cert
        self.grants = []
        self.superseded_at = None


class Keyring:
    def __init__(self, grace_ms=86_400_000):
        self.grace = grace_ms
        self.pins = {}  # tree_id -> (admin_pk, passphrase)
        self.epochs = {}  # (tree_id, epoch) -> EpochState
        self.key_ids = {}  # key_id -> (tree_id, epoch)
        self.last_rotation = {}  # tree_id -> time
        self.dicts = {}  # dict_id -> Dictionary  (application-wide)
        self.tree_dicts = {}  # tree_id -> {dict_id: Dictionary}

    def tree_epochs(self, tree_id):
        return sorted(e for (t, e) in self.epochs if t == tree_id)

    def add_grant(self, g, now):
        c = g.cert
        tid = c.tree_id
        # admin pinning
        pin = self.pins.get(tid)
        if pin is not None:
            if pin[0] != c.admin_pk:
                raise WError("epoch certificate signed by a different admin than the pinned one")
            if pin[1] != c.passphrase():
                raise WError("passphrase flag differs from the pinned one")
        kid = c.key_id()
        other = self.key_ids.get(kid)
        if other is not None and other != (tid, c.epoch):
            raise WError("key id conflict")
        st = self.epochs.get((tid, c.epoch))
        if st is not None and st.cert.signed_bytes() + st.cert.sig != c.signed_bytes() + c.sig:
            raise WError("epoch conflict: two certificates of one epoch")
        held = self.tree_epochs(tid)
        if held and c.epoch < held[0]:
            return "ignored"
        # contradictions within the epoch
        dropped = []
        if st is not None:
            for h in st.grants:
                hs, ns = h.g.scope, g.scope
                if hs.contains(ns):
                    ok = derive_scope_key(hs, h.g.key, ns) == g.key
                elif ns.contains(hs):
                    ok = derive_scope_key(ns, g.key, hs) == h.g.key
                else:
                    continue
                if not ok:
                    if g.auth_kind == 1 and h.prov[0] != "admin":
                        dropped.append(h)
                    else:
                        raise WError("contradicts the key derived from the held grant for '%s'" % hs.text())
        # provenance
        if g.auth_kind == 1:
            prov = ("admin",)
        else:
            prov = ("delegated", g.narrower_pk)
            if st is not None:
                best = None
                for h in st.grants:
                    if h in dropped or not h.verified():
                        continue
                    if h.g.scope.contains(g.scope) and derive_scope_key(h.g.scope, h.g.key, g.scope) == g.key:
                        # choose the most trusted / broadest: admin-signed first, then least specific
                        rank = (0 if h.prov[0] == "admin" else 1, h.g.scope.specificity())
                        if best is None or rank < best[0]:
                            best = (rank, h)
                if best:
                    prov = ("derived", best[1].g.scope)
        # epoch bookkeeping
        if not held:
            self.pins[tid] = (c.admin_pk, c.passphrase())
        if st is None:
            cur = held[-1] if held else None
            st = EpochState(c)
            if cur is not None and c.epoch > cur:
                for e in held:
                    if e < cur:
                        self._drop_epoch(tid, e)
                    elif self.epochs[(tid, e)].superseded_at is None:
                        self.epochs[(tid, e)].superseded_at = now
                self.last_rotation[tid] = now
            elif cur is not None and c.epoch < cur:
                st.superseded_at = self.last_rotation.get(tid, now)
            self.epochs[(tid, c.epoch)] = st
            self.key_ids[kid] = (tid, c.epoch)
        for h in dropped:
            st.grants.remove(h)
        # same scope already held: keep one (replace if the new one is more trusted)
        for h in list(st.grants):
            if h.g.scope == g.scope:
                if h.verified() or not (prov[0] in ("admin", "derived")):
                    return "duplicate"
                st.grants.remove(h)
        newh = HeldGrant(g, prov)
        st.grants.append(newh)
        if newh.verified():
            for h in st.grants:
                if h is not newh and h.prov[0] == "delegated" and g.scope.contains(h.g.scope):
                    h.prov = ("derived", g.scope)
        return "added"

    def _drop_epoch(self, tid, e):
        st = self.epochs.pop((tid, e))
        self.key_ids.pop(st.cert.key_id(), None)

    def add_tree_key(self, tk, now):
        return self.add_grant(tk.grant(Scope(0)), now)

    def add_string(self, item, now):
        if "key" in item:
            return self.add_tree_key(TreeKey.parse(item["key"]), now)
        return self.add_grant(parse_grant_string(item["grant"]), now)

    def add_dictionary(self, d, tree_id=None):
        if tree_id is None:
            self.dicts[d.id] = d
        else:
            self.tree_dicts.setdefault(tree_id, {})[d.id] = d

    def dicts_for(self, tree_id):
        r = dict(self.dicts)
        r.update(self.tree_dicts.get(tree_id, {}))
        return r

    def accepts(self, tid, epoch, ts_ms, now, live):
        st = self.epochs[(tid, epoch)]
        if ts_ms > st.cert.not_after:
            raise WError("dated after the epoch's end")
        later = [self.epochs[(t, e)].cert for (t, e) in self.epochs if t == tid and e > epoch]
        if later:
            cutoff = min(c.prev_cutoff for c in later)
            if ts_ms >= cutoff:
                raise WError("dated at or after the cutoff")
            if live and st.superseded_at is not None and now > st.superseded_at + self.grace:
                raise WError("grace over")


class Opened:
    pass


def open_envelope(kr, env, now, live=True, roots_cache=None, trace=None):
    h = parse_envelope(env)  # step 1
    if h.flags != 0:  # step 2
        raise WError("flags")
    te = kr.key_ids.get(h.key_id)  # step 3
    if te is None:
        raise WError("unknown key id")
    st = kr.epochs[te]
    c = st.cert
    # step 4
    name_pt = aead_open(h.suite, sealed_name_key(c.N, h.nonce, h.suite), h.nonce, h.sealed_name, h.name_ad)
    m = struct.unpack(">H", name_pt[:2])[0]
    if 2 + m > len(name_pt):
        raise WError("name length")
    if any(name_pt[2 + m:]):
        raise WError("name padding")
    if h.S != -(-(2 + m) // 32) * 32 + 16:
        raise WError("name padding not minimal")
    try:
        topic = name_pt[2:2 + m].decode("utf-8")
    except UnicodeDecodeError:
        raise WError("name utf8")
    levels = check_topic(topic)
    if len(levels) != h.n:
        raise WError("levels")
    for i, s in enumerate(levels):
        if token(c.R, i, s) != h.tokens[i]:
            raise WError("token mismatch")
    # step 5
    cands = [hg for hg in st.grants if hg.g.scope.covers_topic(topic)]
    if not cands:
        raise WError("no grant covers topic")
    best = max(cands, key=lambda hg: hg.g.scope.specificity())
    M = derive_topic_key(best.g.scope, best.g.key, topic)
    # step 6
    bk, commit = body_key_commit(M, h.nonce, h.suite)
    if commit != h.commit:
        raise WError("commitment")
    # step 7
    pt = aead_open(h.suite, bk, h.nonce, h.ciphertext, h.header)
    if trace is not None:
        trace["body"] = pt
        trace["topic"] = topic
    # step 8
    b = parse_body(pt)
    kr.accepts(c.tree_id, c.epoch, b.ts_ms, now, live)  # 8a
    verify_body_sig(b, c.tree_id, c.epoch, topic, roots_cache)  # 9
    payload = decompress(b.codec, b.payload, kr.dicts_for(c.tree_id))  # 10
    o = Opened()
    o.topic, o.sender, o.msg_id, o.ts_ms = topic, b.sender_pk, b.msg_id, b.ts_ms
    o.content_type, o.payload, o.tree_id, o.epoch = b.content_type, payload, c.tree_id, c.epoch
    # provenance: most trusted among covering grants
    order = {"admin": 0, "derived": 1, "delegated": 2}
    o.provenance = min(cands, key=lambda hg: order[hg.prov[0]]).prov_text()
    o.body = b
    return o
