// Node.js only: the `tls` connect option as `ws` options, with the Rust client's semantics
// (client/src/transport.rs `tls_client`, options.rs `TlsPin` / `TlsRoot`):
//
// - `pin`: the relay's certificate must be one of the pinned ones — SHA-256 of its DER bytes,
//   what `whispeer-relay tls generate` prints. Pinning replaces chain validation: no
//   certificate authority is consulted and the host name is not compared (the pin names the
//   exact certificate), but the TLS handshake is still verified with that certificate's key.
//   `ca` is not used then.
// - `ca`: extra trusted roots *added to* the default ones (Node's `ca` alone would replace
//   them); chain and host-name checks stay as they are.
import * as tls from 'node:tls';
import { isIP } from 'node:net';
import { createHash, X509Certificate, constants } from 'node:crypto';
import { WhispeerError } from './errors.js';

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/** The certificates of the `ca` entries (PEM text), each one parsed: INVALID_OPTION if none or bad. */
function pemCertificates(entries) {
  const certs = [];
  const selfSigned = new Map(); // subject -> where, of self-issued end-entity certificates
  entries.forEach((entry, i) => {
    const what = entries.length > 1 ? `tls.ca[${i}]` : 'tls.ca';
    const text = typeof entry === 'string' ? entry : Buffer.from(entry.buffer, entry.byteOffset, entry.byteLength).toString('latin1');
    const blocks = text.match(PEM_CERT) ?? [];
    if (blocks.length === 0)
      throw new WhispeerError('INVALID_OPTION', `${what}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it`);
    for (const b of blocks) {
      let x;
      try {
        x = new X509Certificate(b);
      } catch (e) {
        throw new WhispeerError('INVALID_OPTION', `${what}: not a certificate: ${e.message}`);
      }
      // OpenSSL looks a self-signed certificate up in the roots by its subject and tries only
      // the first root of that name: of two relay certificates from `tls generate` (both
      // `CN=whispeer relay`) only the first listed could ever be accepted, the other refused
      // as "self-signed certificate" (Rust tries every root). Refused here, not at rotation.
      if (!x.ca && x.subject === x.issuer) {
        if (selfSigned.has(x.subject))
          throw new WhispeerError(
            'INVALID_OPTION',
            `${what}: a second self-signed certificate with the subject of ${selfSigned.get(x.subject)} ` +
              `(${x.subject.replace(/\n/g, ', ')}): Node.js would only ever try the first; to accept ` +
              'either of two self-signed relay certificates (a rotation), pin both: tls: { pin: [old, new] }',
          );
        selfSigned.set(x.subject, what);
      }
      certs.push(b);
    }
  });
  return certs;
}

/** The roots Node trusts by default (with NODE_EXTRA_CA_CERTS where Node can list them). */
function defaultRoots() {
  return typeof tls.getCACertificates === 'function' ? tls.getCACertificates('default') : tls.rootCertificates;
}

/** `tls.connect` that fails unless the server's certificate is one of `pins` (hex SHA-256). */
function pinnedConnect(pins) {
  return function connect(options) {
    // As `ws`'s own tlsConnect: SNI with the host name (none for an IP address).
    options.path = undefined;
    if (!options.servername && options.servername !== '')
      options.servername = isIP(options.host) ? '' : options.host;
    const socket = tls.connect({
      ...options,
      // Chain and name are not checked (the pin is), as Rust's PinVerifier; `secureConnect`
      // below is emitted in the same turn that finishes the handshake, before the upgrade
      // request queued on the socket is written, so a mismatch sends the relay nothing.
      rejectUnauthorized: false,
      // A renegotiation could bring another certificate after the check (rustls, the Rust
      // client's TLS, never renegotiates either).
      secureOptions: (options.secureOptions ?? 0) | constants.SSL_OP_NO_RENEGOTIATION,
    });
    socket.once('secureConnect', () => {
      const cert = socket.getPeerX509Certificate?.();
      const got = cert ? createHash('sha256').update(cert.raw).digest('hex') : undefined;
      if (got !== undefined && pins.includes(got)) return;
      socket.destroy(
        new Error(
          got === undefined
            ? 'the relay presented no certificate to check the pin against'
            : `the relay's certificate has SHA-256 fingerprint sha256:${got}, which is not the pinned one`,
        ),
      );
    });
    return socket;
  };
}

/** `ws` options for the checked `tls` option (`tlsOption` in client.js). */
export function tlsDialOptions({ pins, ca }) {
  const roots = ca ? pemCertificates(ca) : undefined; // checked also when pins make it unused
  // Only the connection function: no `rejectUnauthorized: false` where anything else could
  // pick it up.
  if (pins) return { createConnection: pinnedConnect(pins) };
  return { ca: [...defaultRoots(), ...roots] };
}
