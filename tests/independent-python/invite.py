"""Invites (§7) with a hand-written RFC 9180 base-mode HPKE open."""
import hmac
import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

import whispeer as w
import ed25519 as ed

INFO = b"whispeer/v2/invite"
KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003


def _extract(salt, ikm):
    return hmac.new(salt or b"\0" * 32, ikm, hashlib.sha256).digest()


def _expand(prk, info, L):
    out, t, i = b"", b"", 1
    while len(out) < L:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:L]


def _lextract(suite_id, salt, label, ikm):
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _lexpand(suite_id, prk, label, info, L):
    return _expand(prk, struct.pack(">H", L) + b"HPKE-v1" + suite_id + label + info, L)


def x25519_pub(sk):
    return X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()


def hpke_context(skR, pkR, enc, info):
    kem_suite = b"KEM" + struct.pack(">H", KEM_ID)
    dh = X25519PrivateKey.from_private_bytes(skR).exchange(X25519PublicKey.from_public_bytes(enc))
    eae_prk = _lextract(kem_suite, b"", b"eae_prk", dh)
    shared = _lexpand(kem_suite, eae_prk, b"shared_secret", enc + pkR, 32)
    suite = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)
    psk_id_hash = _lextract(suite, b"", b"psk_id_hash", b"")
    info_hash = _lextract(suite, b"", b"info_hash", info)
    ctx = b"\x00" + psk_id_hash + info_hash
    secret = _lextract(suite, shared, b"secret", b"")
    key = _lexpand(suite, secret, b"key", ctx, 32)
    nonce = _lexpand(suite, secret, b"base_nonce", ctx, 12)
    return key, nonce


def hpke_open(skR, enc, ct, info, aad):
    pkR = x25519_pub(skR)
    key, nonce = hpke_context(skR, pkR, enc, info)
    return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)


def open_invite(s, recipient_wssec, now_ms):
    ed_seed, x_sk = w.parse_wssec(recipient_wssec)
    ed_pk = ed.public_key(ed_seed)
    x_pk = x25519_pub(x_sk)
    b = w.bech32m_decode(s, "wsinv")
    if not b:
        raise w.WError("empty invite")
    fmt = b[0]
    if fmt == 1:
        raise w.WError("old version")
    if fmt not in (2, 3):
        raise w.WError("unsupported invite version %d" % fmt)
    if len(b) < 33 + 16:
        raise w.WError("cannot open")
    enc, ct = b[1:33], b[33:]
    try:
        pt = hpke_open(x_sk, enc, ct, INFO, x_pk)
    except Exception:
        raise w.WError("cannot open")
    if not pt or pt[0] != fmt:
        raise w.WError("cannot open")
    r = w.Reader(pt)
    r.u8()
    inviter = r.take(32)
    if not ed.is_point(inviter):
        raise w.WError("inviter key not a point")
    expiry = r.u64()
    sig = r.take(64)
    dicts_raw = None
    if fmt == 2:
        grant_bytes = r.rest()
    else:
        grant_bytes = r.take(r.u16())
    grant = w.parse_grant_bytes(grant_bytes)
    entries = None
    if fmt == 3:
        dstart = r.i
        n = r.u8()
        if n == 0:
            raise w.WError("invite carries no dictionary (n = 0)")
        entries = []
        prev = None
        for _ in range(n):
            did = r.take(16)
            ln = r.u32()
            if not 8 <= ln <= 114688:
                raise w.WError("dictionary length %d out of range" % ln)
            D = r.take(ln)
            if prev is not None and not did > prev:
                raise w.WError("dictionary ids not strictly ascending")
            prev = did
            entries.append((did, D))
        if not r.done():
            raise w.WError("trailing bytes after the dictionaries")
        dicts_raw = pt[dstart:]
    sig_in = ((b"whispeer/v2/invite\0" if fmt == 2 else b"whispeer/v2/invite3\0") + ed_pk + x_pk
              + grant.cert.tree_id + w.u64(grant.cert.epoch) + w.lp(grant.scope.text().encode())
              + w.u64(expiry) + w.H(grant_bytes) + (w.H(dicts_raw) if fmt == 3 else b""))
    if not ed.verify_strict(inviter, sig_in, sig):
        raise w.WError("bad signature")
    if now_ms > expiry:
        raise w.WError("invite expired")
    dicts = None
    if fmt == 3:
        dicts = []
        for did, D in entries:
            d = w.Dictionary(D)
            if d.id != did:
                raise w.WError("dictionary id does not match its bytes")
            dicts.append(d)
    return {"inviter_pk": inviter, "expiry_ms": expiry, "grant": grant, "dicts": dicts,
            "from_admin": inviter == grant.cert.admin_pk}
