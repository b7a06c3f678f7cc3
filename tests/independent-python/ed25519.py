"""Pure-Python Ed25519 with strict verification as described in PROTOCOL.md §1.3.

Written from RFC 8032 and the §1.3 description of verify_strict (no Rust read).
Signing is delegated to PyNaCl (deterministic RFC 8032); verification is our own.
"""
import hashlib

p = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
d = (-121665 * pow(121666, p - 2, p)) % p
SQRT_M1 = pow(2, (p - 1) // 4, p)


def _inv(x):
    return pow(x, p - 2, p)


# extended coordinates (X, Y, Z, T)
def _add(P, Q):
    X1, Y1, Z1, T1 = P
    X2, Y2, Z2, T2 = Q
    A = (Y1 - X1) * (Y2 - X2) % p
    B = (Y1 + X1) * (Y2 + X2) % p
    C = 2 * T1 * T2 * d % p
    D = 2 * Z1 * Z2 % p
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % p, G * H % p, F * G % p, E * H % p)


def _mul(s, P):
    Q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            Q = _add(Q, P)
        P = _add(P, P)
        s >>= 1
    return Q


def _encode(P):
    X, Y, Z, _ = P
    zi = _inv(Z)
    x, y = X * zi % p, Y * zi % p
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def decode_point(b):
    """RFC 8032 5.1.3 decoding. Returns None when not a point.

    Note: RFC 8032 rejects y >= p; curve25519-dalek accepts non-canonical y. The spec
    (§1.3) only says 'does not decode to a curve point' -- we follow RFC 8032.
    """
    if len(b) != 32:
        return None
    y = int.from_bytes(b, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= p:
        return None
    x2 = (y * y - 1) * _inv(d * y * y + 1) % p
    if x2 == 0:
        if sign:
            return None
        x = 0
    else:
        x = pow(x2, (p + 3) // 8, p)
        if (x * x - x2) % p != 0:
            x = x * SQRT_M1 % p
        if (x * x - x2) % p != 0:
            return None
        if (x & 1) != sign:
            x = p - x
    return (x, y, 1, x * y % p)


def is_point(b):
    return decode_point(b) is not None


def _is_identity(P):
    X, Y, Z, _ = P
    return X % p == 0 and (Y - Z) % p == 0


def is_small_order(P):
    return _is_identity(_mul(8, P))


gy = 4 * _inv(5) % p
BASE = decode_point(int.to_bytes(gy, 32, "little"))


def verify_strict(pk, msg, sig):
    if len(sig) != 64 or len(pk) != 32:
        return False
    Rb, Sb = sig[:32], sig[32:]
    S = int.from_bytes(Sb, "little")
    if S >= L:
        return False
    R = decode_point(Rb)
    A = decode_point(pk)
    if R is None or A is None:
        return False
    if is_small_order(R) or is_small_order(A):
        return False
    k = int.from_bytes(hashlib.sha512(Rb + pk + msg).digest(), "little") % L
    negA = ((-A[0]) % p, A[1], A[2], (-A[3]) % p)
    Rc = _add(_mul(S, BASE), _mul(k, negA))
    return _encode(Rc) == Rb


def public_key(seed):
    from nacl.signing import SigningKey
    return bytes(SigningKey(seed).verify_key)


def sign(seed, msg):
    from nacl.signing import SigningKey
    return SigningKey(seed).sign(msg).signature
