// The JS half of the whispeer client: a thin driver of the Rust connection engine (wasm
// `Engine`, ../shared/ENGINE.md §3). It opens WebSockets when the engine asks, moves their
// bytes, runs one timer and hands events to promises and subscriptions. Every protocol
// decision — handshake, QoS 1/2 outbox and publish ids, acks, replay, durable
// subscriptions, heartbeats, backoff, flush — and everything about messages (keys,
// sealing, opening, dedup) happens in Rust.

import { ClientCore, Engine, Keyring, TreeKey, Grant, Identity, OpenedInvite, encodeValue, typedTopic } from '../pkg/whispeer_wasm.js';
import { readMessage } from './message.js';

let WebSocketImpl = globalThis.WebSocket;
// Whether WebSocketImpl takes the `ws` package's options (`maxPayload`): then a message over
// the frame cap is refused before it is buffered.
let wsOptions = false;

/** Used by the Node entry point to supply the `ws` package (`options`: it takes `ws`'s). */
export function setWebSocket(impl, options = false) {
  WebSocketImpl = impl;
  wsOptions = options;
}

// Node.js with the `ws` package only (set by the Node entry, js/tls.node.js): turns a checked
// `tls` option into `ws` options for `wss://` dials. Browsers have none: their WebSocket
// takes no TLS settings, so `tls` is refused there (UNSUPPORTED) instead of being ignored.
let tlsDialer = null;

/** Used by the Node entry point alongside `setWebSocket(ws, true)`. */
export function setTlsDialer(fn) {
  tlsDialer = fn;
}

const TLS_OPTIONS = ['ca', 'pin'];
// What Rust's `str::trim` removes (Unicode White_Space), so a pin parses here exactly when
// `TlsPin::sha256_hex` parses it (JS `trim` also removes U+FEFF, which Rust keeps).
const RUST_TRIM = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g;

/**
 * A certificate pin as the Rust client's `TlsPin::sha256_hex` reads it: the SHA-256 of the
 * relay certificate's DER bytes, 64 hex digits (either case) with an optional `sha256:` /
 * `SHA256:` prefix; colons (`openssl x509 -fingerprint -sha256`) and ASCII whitespace are
 * ignored. Returns the 64 lowercase digits; INVALID_OPTION otherwise.
 */
export function parseTlsPin(s, what = 'tls.pin') {
  if (typeof s !== 'string')
    throw new WhispeerError('INVALID_OPTION', `${what}: expected a 'sha256:…' string, got ${typeof s}`);
  let t = s.replace(RUST_TRIM, '');
  if (t.startsWith('sha256:') || t.startsWith('SHA256:')) t = t.slice(7);
  const digits = t.replace(/[:\t\n\f\r ]/g, '');
  if (digits.length !== 64)
    throw new WhispeerError(
      'INVALID_OPTION',
      `${what}: a SHA-256 fingerprint has 64 hex digits, ${JSON.stringify(s)} has ${digits.length}`,
    );
  if (!/^[0-9a-fA-F]{64}$/.test(digits))
    throw new WhispeerError('INVALID_OPTION', `${what}: ${JSON.stringify(s)} is not hexadecimal`);
  return digits.toLowerCase();
}

/**
 * Checks the `tls` connect option: `{ pin }` (one or several fingerprints, as the Rust
 * client's `TlsPin`) and/or `{ ca }` (extra trusted roots, PEM, as `TlsRoot`). Returns
 * `{ pins, ca }` (`pins`: lowercase hex; `ca`: the PEM entries, checked by the dialer).
 */
export function tlsOption(tls) {
  if (tls === null || typeof tls !== 'object' || Array.isArray(tls))
    throw new WhispeerError('INVALID_OPTION', "tls: expected { pin: 'sha256:…' } and/or { ca: PEM }");
  checkOptions('tls', tls, TLS_OPTIONS);
  const out = {};
  if (tls.pin !== undefined) {
    const list = Array.isArray(tls.pin) ? tls.pin : [tls.pin];
    // An empty list would silently mean "no pinning": refused, never a weaker connection.
    if (list.length === 0) throw new WhispeerError('INVALID_OPTION', 'tls.pin: expected at least one fingerprint');
    out.pins = list.map((p, i) => parseTlsPin(p, Array.isArray(tls.pin) ? `tls.pin[${i}]` : 'tls.pin'));
  }
  if (tls.ca !== undefined) {
    const list = Array.isArray(tls.ca) ? tls.ca : [tls.ca];
    if (list.length === 0) throw new WhispeerError('INVALID_OPTION', 'tls.ca: expected at least one PEM certificate');
    for (const c of list)
      if (typeof c !== 'string' && !(c instanceof Uint8Array))
        throw new WhispeerError('INVALID_OPTION', 'tls.ca: expected PEM text (a string or Buffer) or an array of them');
    out.ca = list;
  }
  if (!out.pins && !out.ca) throw new WhispeerError('INVALID_OPTION', "tls: expected { pin: 'sha256:…' } and/or { ca: PEM }");
  return out;
}

/** The protocol's default `max_frame` (PROTOCOL §11), the Rust client's default cap too. */
const DEFAULT_MAX_FRAME = 1024 * 1024;
/** The protocol's ceiling on any `max_frame`. */
const MAX_FRAME_CEILING = 64 * 1024 * 1024;
/** The engine's default `keptBytes`. */
const DEFAULT_KEPT_BYTES = 64 * 1024 * 1024;

/** Wraps a number so it is always encoded as a CBOR float (for Rust `f32`/`f64` fields). */
export function float(x) {
  return { __whispeerFloat: Number(x) };
}

import { WhispeerError } from './errors.js';
import { persistenceOption } from './persist.js';

export { WhispeerError };

/** Errors thrown by the wasm layer (`name` WhispeerError) as real `WhispeerError`s. */
function wrap(e) {
  if (e instanceof WhispeerError || !e || e.name !== 'WhispeerError') return e;
  return new WhispeerError(e.code, e.message, e.reason ? { reason: e.reason } : undefined);
}

const noop = () => {};

/** Errors nobody listens for that are logged a minute (see `Client#logUnheard`). */
const ERRORS_LOGGED_PER_MINUTE = 10;

/**
 * Relay- or member-chosen text with its control characters (terminal escapes, newlines)
 * and the characters that reorder or break lines on a terminal (bidi controls, U+2028/9,
 * interlinear annotation) shown as `?` — the set the Rust client escapes
 * (`printable::is_terminal_hostile`).
 */
function printable(text) {
  return String(text).replace(/[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufff9-\ufffb]/g, '?');
}

/**
 * `wrap(e)` for an error whose message may carry relay-chosen text (a refused subscribe or
 * publish): built anew with its control characters shown as `?`, so neither its message
 * nor its stack (written when an error is made) puts terminal escapes or fake lines on a
 * console (`#logUnheard`, or an app that logs it).
 */
function wrapRelay(e) {
  const w = wrap(e);
  if (!(w instanceof WhispeerError) || printable(w.message) === w.message) return w;
  const { code, message, name: _n, ...details } = w;
  return new WhispeerError(code, printable(message), Object.keys(details).length ? details : undefined);
}

/** The error `Client.connect` rejects with when its `signal` aborts it. */
function aborted(signal) {
  const why = signal.reason instanceof Error ? signal.reason.message : signal.reason;
  return new WhispeerError('ABORTED', `connect aborted${why === undefined ? '' : `: ${why}`}`);
}

/** Refuses option names `known` does not list (typos are errors, not silently ignored). */
function checkOptions(what, options, known) {
  if (options == null) return {};
  if (typeof options !== 'object') throw new WhispeerError('INVALID_OPTION', `${what}: options must be an object`);
  for (const k of Object.keys(options))
    if (!known.includes(k))
      throw new WhispeerError('INVALID_OPTION', `${what}: unknown option ${JSON.stringify(k)} (known: ${known.join(', ')})`);
  return options;
}

const CONNECT_OPTIONS = [
  'identity', 'keys', 'compression', 'suite', 'padding', 'sign', 'topics', 'reconnect', 'connectTimeoutMs',
  'retryFirstConnect', 'reconnectBuffer', 'keptBytes', 'subscriptionCapacity', 'heartbeatMs',
  'sendHighWaterMark', 'name', 'auth', 'persistence', 'maxPayload', 'dedupCapacity', 'maxFrame',
  'signal', 'tls', 'requireBoundAuth',
];
/** The connect options kept past the constructor (none of them secret; see `#opts`). */
const KEPT_OPTIONS = [
  'reconnect', 'connectTimeoutMs', 'retryFirstConnect', 'reconnectBuffer', 'keptBytes', 'subscriptionCapacity',
  'heartbeatMs', 'sendHighWaterMark', 'name', 'maxPayload', 'dedupCapacity', 'requireBoundAuth',
];
const TOPIC_OPTIONS = ['compression', 'padding', 'suite', 'requireSigned', 'allowSenders'];

/**
 * `topics` as the engine reads its publisher policies (`requireSigned`, `allowSenders`): an
 * Identity in `allowSenders` stands for its sender id. The engine checks the rest.
 */
function policyTopics(topics) {
  if (topics == null || typeof topics !== 'object') return topics;
  const out = {};
  for (const [filter, o] of Object.entries(topics)) {
    const senders = o?.allowSenders;
    out[filter] = Array.isArray(senders)
      ? { ...o, allowSenders: senders.map((s) => (s instanceof Identity ? s.senderId : s)) }
      : o;
  }
  return out;
}

/**
 * The relay URLs of `Client.connect`: one `ws://`/`wss://` URL, an array of them, or a
 * comma-separated list (as the CLI's `--relay a,b,c`), in the order they are tried.
 */
function relayUrls(url) {
  const list = Array.isArray(url) ? url : typeof url === 'string' ? url.split(',') : [url];
  const urls = list.map((u) => (typeof u === 'string' ? u.trim() : u)).filter((u) => u !== '');
  if (urls.length === 0)
    throw new WhispeerError('INVALID_URL', `expected a relay URL or a list of them, got ${JSON.stringify(url)}`);
  for (const u of urls)
    if (typeof u !== 'string' || !/^wss?:\/\//.test(u))
      throw new WhispeerError('INVALID_URL', `relay URL must be ws:// or wss://, got ${u}`);
  return urls;
}
/**
 * The relay name a relay-bound sign-in signs for `url` (PROTOCOL §3.5.6): the host as the
 * WHATWG URL parser gives it (lowercase, international names in their `xn--` form, IPv6 in
 * brackets), `:`, and the port dialed (the scheme's default when the URL has none). The
 * engine signs it when the relay's challenge asks for a bound sign-in.
 */
export function relayName(url) {
  try {
    const u = new URL(url);
    return `${u.hostname}:${u.port || (u.protocol === 'wss:' ? '443' : '80')}`;
  } catch {
    return null;
  }
}
/** The content type of a retained value's clear (PROTOCOL §4.11; Rust `core::CLEAR_RETAINED`). */
const CLEAR_RETAINED = 'application/vnd.whispeer.clear-retained';
/** Publishes handed to the engine before it is pumped at once (the batch-signature size). */
const BATCH_PUMP = 64;
/**
 * The longest an Ack waits for the state store to commit what it covers (`#holdAck`), and
 * the most sequences held Acks cover: both well before the relay's own bounds (its ack
 * timeout, 30 s by default, redelivers what is unacknowledged; its credit, 4,096 messages
 * per subscription by default, stops a subscription whose acks wait), as the Rust client.
 */
const ACK_HOLD_MAX_MS = 10_000;
const ACK_HOLD_MAX_SEQS = 4096;
/** After a failed state write, the wait before it is tried again: 100 ms doubling to 5 s. */
const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 5_000;
/** Whether an engine frame is an `Ack` (PROTOCOL §3: a map of 2 whose key 0, the type, is 8). */
const isAck = (f) => f.length >= 3 && f[0] === 0xa2 && f[1] === 0x00 && f[2] === 0x08;
/** Whether an engine frame is a flush's `Ping` (type 11; a heartbeat's nonce, key 1, is 0). */
const isFlushPing = (f) => f.length >= 5 && f[0] === 0xa2 && f[1] === 0x00 && f[2] === 0x0b && f[3] === 0x01 && f[4] !== 0x00;
/** How many sequences an `Ack` frame covers (its array's length, key 1; 1 if unreadable). */
function ackSeqs(f) {
  if (f[3] !== 0x01 || (f[4] & 0xe0) !== 0x80) return 1;
  const n = f[4] & 0x1f;
  if (n < 24) return n;
  if (n === 24) return f[5] ?? 1;
  if (n === 25) return ((f[5] ?? 0) << 8) | (f[6] ?? 0);
  if (n === 26) return (((f[5] ?? 0) << 24) | ((f[6] ?? 0) << 16) | ((f[7] ?? 0) << 8) | (f[8] ?? 0)) >>> 0;
  return 1;
}
/** …or once they hold this many payload bytes (large messages gain nothing from waiting). */
const BATCH_PUMP_BYTES = 64 * 1024;
const PUBLISH_OPTIONS = ['qos', 'retain', 'ack', 'tree'];
const PUBLISH_BYTES_OPTIONS = [...PUBLISH_OPTIONS, 'contentType'];
const SUBSCRIBE_OPTIONS = ['qos', 'replay', 'durable', 'retained', 'olderHistory', 'capacity', 'tree', 'onLag', 'onReplayDone'];
const TYPED_TOPIC_OPTIONS = ['type'];
const TYPED_SUBSCRIBE_OPTIONS = [...SUBSCRIBE_OPTIONS, 'onError'];

/** TYPE_MISMATCH for a publish on typed `topic` (tag `expected`) of another content type. */
function publishMismatch(topic, expected, found, hint = '') {
  return new WhispeerError(
    'TYPE_MISMATCH',
    `topic ${JSON.stringify(topic)} carries type ${JSON.stringify(expected)}, not ${JSON.stringify(found)}${hint}`,
    { topic, expected, found },
  );
}

const mono = () => performance.now();

/** Builds a Keyring from a Keyring, TreeKey, Grant, key string, or an array of those. */
export function toKeyring(keys) {
  const kr = new Keyring();
  try {
    addKeys(kr, keys);
  } catch (e) {
    kr.free();
    throw e;
  }
  return kr;
}

const KEYS_EXPECTED = 'keys: expected a Keyring, TreeKey, Grant, OpenedInvite or key string';
const isDictString = (k) => typeof k === 'string' && /^wsdict1/i.test(k.trim());

/**
 * The tree a key (TreeKey, Grant, OpenedInvite, `wstree1…`/`wskey1…` string) or a
 * Keyring's grants belong to: the trees the `wsdict1…` strings given in the same call serve.
 */
function treesOf(k) {
  if (k instanceof Keyring) return k.toKeyStrings().map((s) => Grant.fromKeyString(s).treeId);
  if (k instanceof TreeKey || k instanceof Grant) return [k.treeId];
  if (k instanceof OpenedInvite) return [k.grant.treeId];
  if (typeof k === 'string' && !isDictString(k))
    return [(/^wstree1/i.test(k.trim()) ? TreeKey.fromKeyString(k) : Grant.fromKeyString(k)).treeId];
  return [];
}

/**
 * The `wsdict1…` strings of one call (one bundle, as a key file written beside a grant):
 * each for every tree of the call's tree keys and grants, or — a call of dictionaries only —
 * for every tree (`treeId` left out), as the Rust library (`AnyKey::add_all`) and CLI bind
 * a key file's dictionaries (PROTOCOL §4.6.1). So a bundle for tree A and one for tree B
 * give A's messages A's dictionaries only.
 */
function looseDictionaries(list) {
  const trees = [...new Set(list.flatMap(treesOf))];
  const out = [];
  for (const k of list) {
    if (!isDictString(k)) continue;
    const dictionary = k.trim();
    if (trees.length === 0) out.push({ dictionary });
    for (const treeId of trees) out.push({ dictionary, treeId });
  }
  return out;
}

function addKeys(kr, keys) {
  const list = Array.isArray(keys) ? keys : keys == null ? [] : [keys];
  for (const k of list) {
    if (k instanceof Keyring) {
      for (const s of k.toKeyStrings()) kr.addKeyString(s);
      // Each dictionary for the tree it came with (an invite's), or every tree (§4.6.1).
      for (const { dictionary, treeId } of k.toDictionaryEntries()) kr.addDictionary(dictionary, treeId);
    }
    else if (k instanceof TreeKey) kr.addTreeKey(k);
    else if (k instanceof Grant) kr.addGrant(k);
    else if (k instanceof OpenedInvite) kr.acceptInvite(k);
    else if (isDictString(k)) continue; // below, with the call's trees
    else if (typeof k === 'string') kr.addKeyString(k);
    else throw new WhispeerError('INVALID_OPTION', KEYS_EXPECTED);
  }
  for (const { dictionary, treeId } of looseDictionaries(list)) kr.addDictionary(dictionary, treeId);
}

/**
 * What `Client.addKeys` adds, in order, parsed before anything is added (a bad key string
 * throws with nothing added): `{ grant, dictionaries, fromKeyring }` per grant — an invite's
 * dictionaries travel with its grant, since they are added only once it is accepted
 * (PROTOCOL §7), and for its tree only (§4.6.1) — and `dictionaries`, `{ dictionary,
 * treeId? }`: those held by a Keyring (with the tree each came with), and the `wsdict1…`
 * strings given in the call, for the call's trees (`looseDictionaries`).
 */
function keysToAdd(keys) {
  const grants = [];
  const dictionaries = [];
  const grant = (g, more = {}) => grants.push({ grant: g, dictionaries: [], fromKeyring: false, ...more });
  const list = Array.isArray(keys) ? keys : [keys];
  for (const k of list) {
    if (k instanceof Keyring) {
      for (const s of k.toKeyStrings()) grant(Grant.fromKeyString(s), { fromKeyring: true });
      dictionaries.push(...k.toDictionaryEntries());
    } else if (k instanceof TreeKey) grant(k.grant('#'));
    else if (k instanceof Grant) grant(k);
    else if (k instanceof OpenedInvite) grant(k.grant, { dictionaries: k.dictionaries });
    else if (isDictString(k)) continue; // below, with the call's trees
    else if (typeof k === 'string')
      // Key strings are all-lowercase or all-uppercase (PROTOCOL §6.1).
      grant(/^wstree1/i.test(k.trim()) ? TreeKey.fromKeyString(k).grant('#') : Grant.fromKeyString(k));
    else throw new WhispeerError('INVALID_OPTION', KEYS_EXPECTED);
  }
  dictionaries.push(...looseDictionaries(list));
  return { grants, dictionaries };
}

/**
 * A grant the engine refuses because it contradicts a grant it holds (`KeyError::
 * Contradicts`, protocol/src/error_keys.rs): only a delegated grant is refused so, and
 * when the held one is verified the engine's keyring would have dropped this one had it
 * come first. Re-adding a Keyring that still holds such a grant (one exported before the
 * admin-signed grant reached it, or a key file saved by an older version) is not an error.
 */
const superseded = (e) => e?.code === 'KEY' && e.reason === 'contradicts';

/** The core's compression: a zstd level (1–22), 0 for none, 'lz4', or 'zstd-dict:ID[:N]'. */
function level(c) {
  if (c === undefined || c === true || c === 'zstd') return 3;
  if (c === false || c === null || c === 'none' || c === 0) return 0;
  if (c === 'lz4') return 'lz4';
  if (typeof c === 'string' && c.startsWith('zstd-dict:')) return c;
  const n = typeof c === 'number' ? c : c && typeof c === 'object' ? c.zstd : undefined;
  if (Number.isInteger(n) && n >= 0 && n <= 22) return n;
  throw new WhispeerError(
    'INVALID_OPTION',
    `compression: expected 'zstd', 'lz4', 'none', a zstd level 1-22, { zstd: level } or 'zstd-dict:ID[:LEVEL]', got ${JSON.stringify(c)}`,
  );
}

/** The AEAD suite: 'xchacha' (XChaCha20-Poly1305, the default) or 'aes-gcm' (AES-256-GCM). */
function suiteName(s, what = 'suite') {
  if (s === 'xchacha' || s === 'aes-gcm') return s;
  throw new WhispeerError('INVALID_OPTION', `${what}: expected 'xchacha' or 'aes-gcm', got ${JSON.stringify(s)}`);
}

/** A subscription: a callback target, or an async iterator of messages. */
export class Subscription {
  #client;
  #callback;
  #queue = []; // { msg, token } (msg undefined: a placeholder, taken silently)
  #waiters = [];
  #ended = false;
  /** Why the relay ended it, for the first `next()` after the end if none was waiting. */
  #endError = null;
  #capacity;
  #onLag;
  #onReplayDone;
  #onError;
  #contentType; // typed: the only content type delivered

  constructor(client, id, filter, callback, options, typed) {
    this.#client = client;
    this.id = id;
    this.filter = filter;
    this.#callback = callback;
    this.#capacity = options.capacity;
    this.#onLag = options.onLag;
    this.#onReplayDone = options.onReplayDone;
    this.#onError = options.onError;
    this.#contentType = typed?.contentType;
    /** A typed topic's subscription: its type tag (else undefined). */
    this.type = typed?.type;
    /** Typed: messages of another type (another tag, or none), refused and never delivered. */
    this.typeMismatches = 0;
    /** The delivery guarantee asked of the relay (0, 1 or 2). */
    this.qos = options.qos ?? 0;
    /** Messages dropped because the iterator was not read fast enough. */
    this.dropped = 0;
    /** Messages lost in all (dropped here, or by the relay for a slow connection). */
    this.lost = 0;
    /** The relay sequence where the replayed history ended (once it did). */
    this.replayedTo = undefined;
  }

  /**
   * @internal At most once, `n` messages were lost: counted, then reported to the
   * subscription's `onLag(n)` and as the client's `lag` event `({ subscription, lost })`.
   */
  _lag(n) {
    if (this.#ended || n <= 0) return;
    this.lost += n;
    if (this.#onLag) {
      try {
        this.#onLag(n);
      } catch (e) {
        this.#client._emit('error', e);
      }
    }
    this.#client._emit('lag', { subscription: this, lost: n });
  }

  /** @internal The history ended at relay sequence `seq`; what follows is live. */
  _replayDone(seq) {
    this.replayedTo = seq;
    if (this.#onReplayDone) {
      try {
        this.#onReplayDone(seq);
      } catch (e) {
        this.#client._emit('error', e);
      }
    }
  }

  /**
   * @internal A typed subscription refuses a message of another type: taken (acked) and
   * counted here and in the client's `typeMismatches`, then reported as a TYPE_MISMATCH
   * WhispeerError to `onError` (else the client's `error` event). The subscription goes on.
   */
  _mismatch(msg, token) {
    const client = this.#client;
    client._ack(token);
    this.typeMismatches++;
    client._countTypeMismatch();
    const err = new WhispeerError(
      'TYPE_MISMATCH',
      printable(`message on ${msg.topic} has type ${JSON.stringify(msg.contentType)}; this subscription takes ${JSON.stringify(this.type)}`),
      { topic: msg.topic, expected: this.type, found: msg.contentType, sender: msg.sender, seq: msg.seq },
    );
    if (!this.#onError) return client._emit('error', err);
    try {
      this.#onError(err);
    } catch (e) {
      client._emit('error', e);
    }
  }

  /** @internal A message (or, `msg` undefined, a placeholder) and the token to ack once taken. */
  _deliver(msg, token) {
    const client = this.#client;
    if (this.#ended) return;
    if (msg !== undefined && this.#contentType !== undefined && msg.contentType !== this.#contentType)
      return this._mismatch(msg, token);
    if (this.#callback) {
      // A callback takes it when called; an async one when its promise settles.
      if (msg === undefined) return client._ack(token);
      try {
        const r = this.#callback(msg);
        if (r && typeof r.then === 'function') {
          r.then(
            () => client._ack(token),
            (e) => {
              client._ack(token);
              client._emit('error', e);
            },
          );
          return;
        }
      } catch (e) {
        client._emit('error', e);
      }
      return client._ack(token);
    }
    if (this.#queue.length === 0 && this.#waiters.length) {
      if (msg === undefined) return client._ack(token);
      this.#waiters.shift().resolve({ value: msg, done: false });
      return client._ack(token);
    }
    if (msg !== undefined && this.qos === 0 && this.#capacity !== undefined && this.#queue.length >= this.#capacity) {
      client._ack(token); // at most once: dropped here, counted and reported
      this.dropped++;
      this._lag(1);
      return;
    }
    this.#queue.push({ msg, token });
  }

  /** @internal */
  _end(error) {
    if (this.#ended) return;
    this.#ended = true;
    // What was delivered and never taken is not acked: the relay delivers it again.
    this.#queue.length = 0;
    const waiters = this.#waiters.splice(0);
    if (error && waiters.length === 0) this.#endError = error;
    for (const w of waiters) {
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  /** Stops the subscription (the relay stops sending; the iterator ends). */
  async unsubscribe() {
    if (this.#ended) return;
    this.#client._unsubscribe(this.id);
    this._end();
  }

  /**
   * Ends this durable subscription and deletes its durable on the relay (its name,
   * position and owner: the name no longer counts against the quota, and a later
   * subscribe with it starts afresh). Resolves once the relay processed it; rejects with
   * `REJECTED` (the relay refused; the subscription is ended all the same),
   * `DISCONNECTED` (not connected, or the connection dropped before the answer: whether
   * it was deleted is not known), or, sending nothing and keeping the subscription,
   * `UNSUPPORTED` (the relay cannot delete durables) or `NOT_DURABLE`.
   */
  async deleteDurable() {
    if (this.#ended) throw new WhispeerError('NOT_DURABLE', 'the subscription has ended');
    await this.#client._deleteDurable(this.id);
    this._end();
  }

  /** The next message (`{ value, done }`), for the async-iterator protocol. */
  next() {
    while (this.#queue.length) {
      const { msg, token } = this.#queue.shift();
      this.#client._ack(token);
      if (msg !== undefined) return Promise.resolve({ value: msg, done: false });
    }
    if (this.#ended) {
      const e = this.#endError;
      this.#endError = null;
      return e ? Promise.reject(e) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /** Ends iteration early (a `break` out of `for await`) and unsubscribes. */
  async return() {
    await this.unsubscribe();
    return { value: undefined, done: true };
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * A topic that carries one type, named by its tag (`client.topic(name, { type })`):
 * `publish` sends values tagged with it (content type `application/cbor; type="<tag>"`,
 * sealed and signed), subscriptions deliver only messages with that tag. The same as the
 * Rust client's `client.topic::<T>(name)` for a `T` with `#[whispeer(type = "<tag>")]`.
 */
export class TypedTopic {
  #client;

  /** @internal Use `client.topic(name, { type })`. */
  constructor(client, name, tag, contentType) {
    this.#client = client;
    /** The topic. */
    this.name = name;
    /** The type tag. */
    this.type = tag;
    /** The content type its messages carry. */
    this.contentType = contentType;
  }

  /** Publishes `value` tagged with the topic's type (options as `client.publish`). */
  publish(value, options = {}) {
    return this.#client._publishTyped(this, value, options);
  }

  /**
   * Subscribes to the topic (as `client.subscribe`, with a callback or as an async
   * iterator): only messages of this type are delivered. One of another type (another
   * tag, or none) is refused: counted (`subscription.typeMismatches`, the client's
   * `stats().typeMismatches`) and reported as a `WhispeerError` with code `TYPE_MISMATCH`
   * to the `onError` option (else the client's `error` event); the subscription goes on.
   */
  subscribe(callback, options) {
    return this.#client._subscribeTyped(this, callback, options);
  }
}

/**
 * A client connected to a relay. Publish and subscribe with plain JS values; the
 * connection reconnects with backoff and resubscribes on its own. Given several relay URLs
 * it fails over between them (the shared engine goes round them: the next one at once
 * after a failure, the backoff after a full round).
 */
export class Client {
  #urls; // the relay URLs, in the order tried
  #url; // the one in use (or last tried)
  #opts;
  #maxFrame; // the largest frame taken from a relay (a WebSocket message)
  #tls = null; // `ws` options for wss:// dials (the `tls` option, Node.js only)
  #sendLimit; // unsent bytes past which a relay that does not read is hung up on
  #stall = null; // the current socket's unsent bytes, watched: { ws, seen, since, timer } (#watchSend)
  #eng;
  #ws = null; // the current socket
  #sockets = new Map(); // engine connection id -> WebSocket
  #state = 'connecting';
  #listeners = new Map();
  #subs = new Map();
  #pendingSubs = new Map(); // local id -> { resolve, reject }
  #acks = new Map(); // publish id (hex) -> { resolve, reject }
  #flushes = new Map(); // flush id -> { resolve, reject }
  #deletes = new Map(); // deletion flush id -> { resolve, reject }
  #nextSub = 1;
  #closing = false;
  #closeWaiters = [];
  // Resolved once the client has finished closing (#finish) and its state store is closed:
  // what close() waits for last, so a store reopened right after is not "in use".
  #endedResolve;
  #ended = new Promise((r) => (this.#endedResolve = r));
  /** A write failed: the next save is a whole snapshot (see `#writeFailed`). */
  #repair = false;
  /** The one `close()` in progress (or done). */
  #closed;
  #first = null; // the pending Client.connect
  #senderId = null; // the identity's (the identity itself is the core's)
  #waiting = []; // publishes held while the socket's send buffer is over the high-water mark
  #waitingTimer = null;
  #pumping = false;
  #handed = 0; // publishes handed to the engine since the last pump
  #pumpQueued = false;
  #again = false;
  #armed; // the deadline the timer is set for
  #timer = null;
  #core; // the ClientCore until the engine takes it
  #coreTaken = false; // handed to `new Engine` (which frees it, also when it throws)
  #openStore; // persistence: opens the store (null without)
  #store = null;
  #logBytes = 0; // appended since the last compaction
  #snapBytes = 0; // the last compaction's size
  #gate = Promise.resolve(); // the last write events wait for (IndexedDB)
  #gated = 0; // event batches waiting for a write
  #inflight = 0; // async writes not yet committed
  #writes = 0; // state writes started, numbered from 1
  #committed = 0; // every write up to this one is done (committed, or failed: #repair)
  #doneWrites = new Set(); // writes done above #committed (their commits may come out of order)
  // Ack frames (and flush Pings behind them) waiting for the store (#holdAck), oldest first:
  // { frame, need: the write that must be done first, at: when held, seqs: sequences covered }
  #heldAcks = [];
  #heldSeqs = 0; // sequences the held Acks cover
  #heldWs = null; // the socket they were made for
  #heldTimer = null; // sends them anyway ACK_HOLD_MAX_MS after the oldest was held
  #retryWait = RETRY_FIRST_MS; // the wait after the next failed write
  #retryAt = 0; // mono(): no state write is tried before (after a failed one)
  #retryTimer = null; // tries the failed write again at #retryAt
  #writeFailures = 0; // state writes that failed (stats().stateWriteFailures)
  #types = new Map(); // typed topic -> { tag, contentType } (client.topic)
  #typeMismatches = 0;

  /**
   * Connects and returns a ready client. The first attempt must succeed unless
   * `retryFirstConnect` is set (then it retries with the reconnect backoff).
   */
  static async connect(url, options = {}) {
    const signal = options?.signal;
    if (signal !== undefined && !(typeof signal?.addEventListener === 'function' && 'aborted' in signal))
      throw new WhispeerError('INVALID_OPTION', 'Client.connect: signal must be an AbortSignal');
    if (signal?.aborted) throw aborted(signal);
    const c = new Client(url, options);
    if (!signal) {
      await c.#start();
      return c;
    }
    // Aborting gives up the connection attempt (and its retries with `retryFirstConnect`):
    // the client closes, its sockets and timers go, and connect rejects with ABORTED.
    const onAbort = () => c.#abort(aborted(signal));
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      await c.#start();
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
    return c;
  }

  /** Use `Client.connect`. */
  constructor(url, options = {}) {
    const urls = relayUrls(url);
    if (!WebSocketImpl) throw new WhispeerError('NO_WEBSOCKET', 'no WebSocket implementation available');
    checkOptions('Client.connect', options, CONNECT_OPTIONS);
    if (options.tls != null) {
      if (!tlsDialer)
        throw new WhispeerError(
          'UNSUPPORTED',
          'tls: certificate pins and extra roots work only in Node.js with the `ws` package; a browser ' +
            "checks a wss:// relay's certificate itself and takes no TLS settings from a page (give the " +
            'relay a certificate the browser trusts, e.g. from a public CA)',
        );
      this.#tls = tlsDialer(tlsOption(options.tls));
    }
    this.#urls = urls;
    this.#url = urls[0];
    // The options kept for the client's life: what the engine is made with (possibly later,
    // once the saved state is loaded) and what this driver reads. Never the secrets (keys,
    // identity, relay account): those go to the Rust core below and are not kept here.
    this.#opts = {
      connectTimeoutMs: 10_000,
      reconnectBuffer: 8 * 1024 * 1024,
      subscriptionCapacity: 65_536,
      sendHighWaterMark: 1024 * 1024,
      name: 'whispeer-js/0.1.0',
    };
    for (const k of KEPT_OPTIONS) if (options[k] !== undefined) this.#opts[k] = options[k];
    this.#opts.topics = policyTopics(options.topics);
    this.#opts.relays = urls.length;
    this.#opts.relayNames = urls.map(relayName);
    const maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
    if (!Number.isInteger(maxFrame) || maxFrame < 4096 || maxFrame > MAX_FRAME_CEILING)
      throw new WhispeerError(
        'INVALID_OPTION',
        `Client.connect: maxFrame must be an integer from 4096 to ${MAX_FRAME_CEILING}, got ${maxFrame}`,
      );
    this.#maxFrame = maxFrame;
    // What the client may legitimately have unsent at once: every kept publish and the
    // offline buffer re-sent on a new connection, on top of the high-water mark publishes
    // wait at. More means the relay stopped reading while the client kept answering it
    // (Pongs, acks): the socket is hung up on and the engine reconnects with its backoff.
    this.#sendLimit =
      (options.keptBytes ?? DEFAULT_KEPT_BYTES) +
      this.#opts.reconnectBuffer +
      this.#opts.sendHighWaterMark +
      4 * maxFrame;
    this.#openStore = persistenceOption(options.persistence);
    let kr;
    let core;
    try {
      // A Keyring made here is a temporary (the core copies it): freed below, not left to
      // the garbage collector with its keys.
      kr = options.keys instanceof Keyring ? options.keys : toKeyring(options.keys);
      const sign = options.sign ?? true;
      core = new ClientCore(kr, level(options.compression), options.padding !== false, sign !== false && sign !== 'off');
      core.setSigning(sign === true ? 'batch' : sign === false ? 'off' : String(sign));
      if (options.suite !== undefined) core.setSuite(suiteName(options.suite));
      if (options.identity) {
        if (!(options.identity instanceof Identity))
          throw new WhispeerError('INVALID_OPTION', 'identity: expected an Identity (Identity.generate() or Identity.fromSecretString())');
        core.setIdentity(options.identity);
        this.#senderId = options.identity.senderId;
      }
      for (const [filter, o] of Object.entries(options.topics ?? {})) {
        checkOptions(`topics[${JSON.stringify(filter)}]`, o, TOPIC_OPTIONS);
        // A rule naming no sealing option adds no sealing rule (it would shadow later ones),
        // as the Rust client's TopicOptions.
        if (o.compression === undefined && o.padding === undefined && o.suite === undefined) continue;
        // What a rule leaves unset is the client's setting (the Rust client's rules start
        // from its defaults): a rule naming only the suite does not turn compression back on
        // for a client that set `compression: 'none'` (PROTOCOL §11, length leaks).
        const suite = o.suite === undefined ? undefined : suiteName(o.suite, `topics[${JSON.stringify(filter)}].suite`);
        core.setTopicOptions(
          filter,
          level(o.compression === undefined ? options.compression : o.compression),
          (o.padding === undefined ? options.padding : o.padding) !== false,
          suite,
        );
      }
      // Relay account (auth = required relays): an account key answers the relay's
      // challenge; a bearer token rides in Hello. Never the identity that signs messages.
      if (options.auth != null) {
        const a = options.auth;
        if (typeof a.key === 'string') core.setAccountKey(a.key);
        else if (typeof a.token === 'string') core.setAuthToken(a.token);
        else throw new WhispeerError('INVALID_OPTION', "auth: expected { key: 'wsp_acct_sk_…' } or { token: '…' }");
      }
      this.#core = core;
      if (!this.#openStore) this.#engine(undefined);
    } catch (e) {
      // Freed here unless the engine took it (an engine option it refused: the core went
      // with the failed construction, and freeing it again threw "null pointer passed to
      // rust" instead of the option's error).
      if (!this.#coreTaken) core?.free();
      throw wrap(e);
    } finally {
      if (kr !== options.keys) kr?.free();
    }
  }

  /** Makes the engine (taking the core), importing `state` (persistence) when given. */
  #engine(state) {
    const seed = new Uint8Array(32);
    globalThis.crypto.getRandomValues(seed);
    const core = this.#core;
    this.#core = undefined;
    this.#coreTaken = true;
    const opts = state === undefined ? this.#opts : { ...this.#opts, state };
    this.#eng = new Engine(core, opts, seed, mono(), Date.now());
  }

  /**
   * With `persistence`: opens and loads the saved state, imports it into the engine and
   * compacts it (the snapshot replaces the log, a torn last write included). A store that
   * cannot be written fails here with STATE, before anything is dialed (README
   * "Persistence"); unlike later writes, whose failures `#write1` reports as `error` events.
   */
  async #restore() {
    let store;
    try {
      store = await this.#openStore();
      const saved = await store.load();
      try {
        this.#engine(saved ?? new Uint8Array(0));
      } catch (e) {
        const w = wrap(e);
        if (w instanceof WhispeerError && w.code === 'STATE') w.message = `${store.where}: ${w.message}`;
        throw w;
      }
      const torn = this.#eng.restoreTornBytes();
      if (torn > 0)
        // Said, not silent: usually a write a crash cut short (its record was never
        // reported), or damage to the last record. A length damaged earlier in the log is
        // refused as corrupt (STATE, above); only in a log of format version 1 did it drop
        // everything after it as torn bytes.
        console.warn(
          `whispeer: ${store.where}: the saved state ended in ${torn} bytes that were no whole record; ` +
            'dropped (a write cut short, or damage)',
        );
      const snap = this.#eng.snapshot(Date.now());
      try {
        await store.replace(snap); // a file: written (or thrown) now; IndexedDB: committed
      } catch (e) {
        const w = wrap(e);
        if (w instanceof WhispeerError && w.code === 'STATE') throw w;
        throw new WhispeerError('STATE', `cannot write ${store.where}: ${e?.message ?? e}`);
      }
      this.#logBytes = 0;
      this.#snapBytes = snap.length;
      this.#store = store;
    } catch (e) {
      store?.close();
      this.#store = null;
      this.#core?.free();
      this.#eng?.free();
      this.#eng = undefined;
      throw wrap(e);
    }
  }

  /** `connecting`, `connected`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The URL of the relay in use (the last one tried while reconnecting). */
  get url() {
    return this.#url;
  }

  /** Every relay URL given, in the order they are tried. */
  get urls() {
    return [...this.#urls];
  }

  /** This client's sender id (`wspk1…`), or null without an identity. */
  get senderId() {
    return this.#senderId;
  }

  /** Bytes the socket has not sent yet (what `publish` waits on above `sendHighWaterMark`). */
  get bufferedAmount() {
    return this.#ws ? this.#ws.bufferedAmount : 0;
  }

  /**
   * Counters: delivered, rejected (could not open), duplicates, relayGaps, refused,
   * reconnects, slowSubscriberDrops, outboxDrops, unackedPublishes (QoS ≥ 1 publishes in
   * the outbox waiting for their PubAck), sealingPublishes (QoS ≥ 1 publishes waiting for
   * their batch signature, not yet in the outbox), outboxBytes, typeMismatches.
   */
  stats() {
    return {
      ...this.#eng.stats(),
      outboxBytes: this.#eng.queuedBytes(),
      typeMismatches: this.#typeMismatches,
      stateWriteFailures: this.#writeFailures,
    };
  }

  /** @internal A typed subscription refused a message of another type. */
  _countTypeMismatch() {
    this.#typeMismatches++;
  }

  /**
   * Listens to `state` (new state, detail), `lag` or `error` (errors thrown by callbacks,
   * non-fatal relay errors). Returns a function that removes the listener.
   */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.#listeners.get(event)?.delete(fn);
  }

  /** @internal */
  #logWindow = { start: 0, n: 0, suppressed: 0 };

  /**
   * An error nobody listens for goes to the console — at most ERRORS_LOGGED_PER_MINUTE a
   * minute (a relay can send error frames without end; console.error writes synchronously
   * and would stall the event loop), then one line saying how many were left out.
   */
  #logUnheard(error) {
    const w = this.#logWindow;
    const now = mono();
    if (now - w.start >= 60_000) {
      if (w.suppressed) console.error(`whispeer: ${w.suppressed} more errors in the last minute not logged (listen to 'error')`);
      this.#logWindow = { start: now, n: 0, suppressed: 0 };
    }
    if (this.#logWindow.n++ < ERRORS_LOGGED_PER_MINUTE) console.error('whispeer:', error);
    else this.#logWindow.suppressed++;
  }

  _emit(event, ...args) {
    const ls = this.#listeners.get(event);
    if (!ls || ls.size === 0) {
      if (event === 'error') this.#logUnheard(args[0]);
      return;
    }
    for (const fn of [...ls]) {
      try {
        fn(...args);
      } catch (e) {
        if (event !== 'error') this._emit('error', e);
      }
    }
  }

  /**
   * Resolves once the state is `state` (immediately if it already is); rejects with
   * `DISCONNECTED` once the client is closed (it never leaves `closed`, so the wait would
   * never end).
   */
  waitForState(state) {
    if (this.#state === state) return Promise.resolve();
    const closed = () => new WhispeerError('DISCONNECTED', `the client closed before it was ${state}`);
    if (this.#state === 'closed') return Promise.reject(closed());
    return new Promise((resolve, reject) => {
      const off = this.on('state', (s) => {
        if (s === state) {
          off();
          resolve();
        } else if (s === 'closed') {
          off();
          reject(closed());
        }
      });
    });
  }

  #setState(s, detail) {
    if (this.#state === s && s !== 'reconnecting') return;
    this.#state = s;
    this._emit('state', s, detail);
  }

  async #start() {
    if (this.#openStore) await this.#restore();
    if (this.#aborted) {
      await this.close();
      throw this.#aborted;
    }
    return new Promise((resolve, reject) => {
      this.#first = { resolve, reject };
      this.#pump();
    });
  }

  #aborted = null;

  /** `Client.connect`'s signal fired before the client was connected. */
  #abort(error) {
    if (this.#aborted || this.#state === 'closed' || this.#state === 'connected') return;
    this.#aborted = error;
    const first = this.#first;
    if (!first) return; // restoring the saved state: #start sees it next
    this.#first = null;
    this.close().then(
      () => first.reject(error),
      () => first.reject(error),
    );
  }

  // ---- persistence: every change written before what it covers is reported ------------

  /**
   * A write that failed: reported, the client goes on (as the Rust client does), and the
   * next save rewrites the whole state: the changes that write carried (a kept publish,
   * dedup entries) are gone from the engine's journal, and appends after it alone would
   * leave them out of the saved state for good.
   */
  #writeFailed(e) {
    this.#repair = true;
    this.#writeFailures++;
    // Tried again after a wait (100 ms doubling to 5 s, as the Rust client), not at every
    // pump: a store that keeps failing is rewritten whole, with an `error` event, only so
    // often. Acks wait meanwhile (#holdAck).
    const wait = this.#retryWait;
    this.#retryWait = Math.min(wait * 2, RETRY_MAX_MS);
    this.#retryAt = mono() + wait;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = this.#state === 'closed' ? null : setTimeout(() => this.#retry(), wait);
    this._emit('error', wrap(e));
  }

  /** A write succeeded: the next failure waits the first wait again. */
  #wrote() {
    if (!this.#repair) this.#retryWait = RETRY_FIRST_MS;
  }

  /** The retry time of a failed write came: the state is rewritten, held Acks go after it. */
  #retry() {
    this.#retryTimer = null;
    if (this.#state === 'closed' || !this.#store) return;
    this.#retryAt = 0;
    this.#pump();
    this.#sendHeldAcks(false);
  }

  /** Writes `bytes` with `op` (append or replace); a Promise while an async write runs. */
  #write1(op, bytes) {
    const n = ++this.#writes;
    try {
      const w = this.#store[op](bytes);
      if (w) {
        this.#inflight++;
        const p = w.then(
          () => this.#wrote(),
          (e) => this.#writeFailed(e),
        ).finally(() => {
          this.#inflight--;
          this.#done(n);
        });
        // Resolves to nothing: `Promise.all` would resolve to [the previous gate's value,
        // …], each gate holding its predecessor's array — one more for every write, for
        // the life of the client (review: ~8.6 M arrays a day at 100 takes a second).
        this.#gate = Promise.all([this.#gate, p]).then(noop);
        return this.#gate;
      }
      this.#wrote();
    } catch (e) {
      this.#writeFailed(e);
    }
    this.#done(n);
    return undefined;
  }

  /**
   * Write `n` is done (committed; or failed, and `#repair` set): the held Acks whose
   * entries every write up to it carried may go (#sendHeldAcks). Each Ack waits for the
   * writes started before it only — not for every write in flight, which under steady
   * traffic with IndexedDB was always one more (review: Acks then left only at the 10 s
   * or 4,096-message bound, with a false `error`, and the last ones before their commit).
   */
  #done(n) {
    this.#doneWrites.add(n);
    while (this.#doneWrites.delete(this.#committed + 1)) this.#committed++;
    if (this.#heldAcks.length > 0) this.#sendHeldAcks(false);
  }

  #compact() {
    // A rewrite after a failed write saves what that write carried: the Acks held for it
    // (and any held while it failed) wait for this one to be done.
    if (this.#repair) for (const h of this.#heldAcks) h.need = Math.max(h.need, this.#writes + 1);
    this.#repair = false;
    const snap = this.#eng.snapshot(Date.now());
    this.#logBytes = 0;
    this.#snapBytes = snap.length;
    return this.#write1('replace', snap);
  }

  /** Saves the engine's changes; returns a Promise when an (async) write is still running. */
  #persist() {
    if (!this.#store) return undefined;
    const b = this.#eng.takeChanges();
    if (this.#repair) {
      // Not before the retry time of the failed write (its timer tries then).
      if (mono() < this.#retryAt) return this.#inflight ? this.#gate : undefined;
      return this.#compact();
    }
    if (b === undefined) return this.#inflight ? this.#gate : undefined;
    this.#logBytes += b.length;
    if (this.#logBytes > Math.max(1 << 20, 2 * this.#snapBytes)) return this.#compact();
    return this.#write1('append', b);
  }

  /**
   * Resolves once every change so far (kept publishes, dedup entries, retained marks,
   * pins) is written to the `persistence` store (at once for a file, which is written
   * synchronously; after the IndexedDB transaction commits in browsers). After a failed
   * write the state is rewritten now, whatever the retry time (a failure is an `error`
   * event; this still resolves).
   */
  async persisted() {
    // Asked for: a failed write is tried now, whatever its retry time.
    this.#retryAt = 0;
    if (this.#eng && this.#store) this.#persist();
    await this.#gate;
  }

  /** Dispatches `events` now, or once `write` and earlier held batches are done. */
  #deliver(events, write) {
    if (!write && this.#gated === 0) {
      for (const e of events) this.#dispatch(e);
      return;
    }
    if (events.length === 0) return;
    this.#gated++;
    this.#gate.then(() => {
      this.#gated--;
      for (const e of events) this.#dispatch(e);
      this.#pump();
    });
  }

  // ---- the driver: sockets, one timer, the drain (ENGINE.md §3) ----------------------

  /** Drains the engine: transmits, then the deadline, then events (dispatched after). */
  #pump() {
    this.#handed = 0;
    if (this.#pumping) {
      this.#again = true; // an app callback re-entered through a command
      return;
    }
    this.#pumping = true;
    try {
      do {
        this.#again = false;
        const eng = this.#eng;
        this.#persist(); // a kept publish is saved before its frame leaves
        for (let t; (t = eng.pollTransmit()) !== undefined; ) {
          // Publishes are sealed inside pollTransmit (the engine's seal jobs, inline here):
          // a kept one is saved before its frame leaves.
          this.#persist();
          if (t instanceof Uint8Array) {
            // An Ack leaves once the dedup entries it covers are written: not while a write
            // is in flight (IndexedDB) nor after one failed (any store, a synchronous file
            // too) until the state is written again; later Acks, and a flush's Ping (a flush
            // covers the acks of what the app took before it), queue behind held ones.
            const ack = isAck(t);
            const behind = this.#heldAcks.length > 0 && this.#heldWs === this.#ws;
            if ((ack && (this.#committed < this.#writes || this.#repair)) || (behind && (ack || isFlushPing(t))))
              this.#holdAck(t, ack);
            else this.#write(t);
          }
          else if (t.dial !== undefined) this.#dial(t.dial, t.relay ?? 0);
          else if (t.hangup !== undefined) this.#hangup(t.hangup);
        }
        this.#arm(eng.pollTimeout());
        const events = [];
        for (let e; (e = eng.pollEvent()) !== undefined; ) {
          // A message event points at the message in wasm memory until the next poll.
          if (e.at !== undefined) e.message = readMessage(e.at, eng);
          events.push(e);
        }
        // Dedup entries, retained marks and acked publishes are saved before the app hears.
        this.#deliver(events, this.#persist());
      } while (this.#again);
    } finally {
      this.#pumping = false;
    }
  }

  /**
   * Holds an `Ack` frame until the (IndexedDB) writes started before it are done: the engine records a
   * message's dedup entry as the app takes it and queues its Ack at once, and the
   * transaction saving the entry commits later. Sent before the commit, a tab closed or
   * crashed in between left the relay holding the Ack while the saved window lacked the
   * message: a re-post within the skew was accepted again after a restart. Only Acks wait
   * (publishes, subscribes go on); they are sent once the writes commit (a failed write is
   * first rewritten whole, `#repair`), and after ACK_HOLD_MAX_MS anyway with an `error`
   * event, so a store that never commits does not stop acknowledging.
   */
  #holdAck(frame, ack) {
    if (this.#heldWs !== this.#ws) {
      this.#heldAcks = []; // made for a socket gone: the relay delivers them again
      this.#heldSeqs = 0;
      this.#heldWs = this.#ws;
      // Their bound goes with them (review: a timer left from a socket gone sent Acks
      // held on the next one early, before their commit).
      clearTimeout(this.#heldTimer);
      this.#heldTimer = null;
    }
    const seqs = ack ? ackSeqs(frame) : 0;
    this.#heldAcks.push({ frame, need: this.#writes, at: mono(), seqs });
    this.#heldSeqs += seqs;
    if (this.#heldTimer === null) this.#armHeld(ACK_HOLD_MAX_MS);
    if (this.#heldSeqs >= ACK_HOLD_MAX_SEQS) queueMicrotask(() => this.#sendHeldAcks(true));
  }

  /** The bound on holding: `ms` from now, when the oldest held frame is ACK_HOLD_MAX_MS old. */
  #armHeld(ms) {
    clearTimeout(this.#heldTimer);
    this.#heldTimer = setTimeout(() => {
      this.#heldTimer = null;
      this.#sendHeldAcks(true);
    }, ms);
  }

  /**
   * Sends the held frames whose writes are done, oldest first (order kept: one still
   * waiting holds back those behind it); all of them when `overdue` (a bound) or closed.
   */
  #sendHeldAcks(overdue) {
    if (this.#heldAcks.length === 0) return;
    let n = this.#heldAcks.length;
    if (!overdue && this.#state !== 'closed') {
      // One failed: the retry timer (#writeFailed) rewrites the state whole, and sends
      // them after (#retry, or #done of the rewrite).
      if (this.#repair) return;
      n = 0;
      while (n < this.#heldAcks.length && this.#heldAcks[n].need <= this.#committed) n++;
      if (n === 0) return;
    }
    const sent = this.#heldAcks.splice(0, n);
    const seqs = sent.reduce((sum, h) => sum + h.seqs, 0);
    this.#heldSeqs -= seqs;
    if (this.#heldAcks.length > 0)
      this.#armHeld(Math.max(0, Math.ceil(this.#heldAcks[0].at + ACK_HOLD_MAX_MS - mono())));
    else {
      clearTimeout(this.#heldTimer);
      this.#heldTimer = null;
    }
    if (overdue)
      this._emit(
        'error',
        new WhispeerError(
          'STATE',
          `persistence: acks of ${seqs} messages sent before the state store committed what they cover (bound: ${ACK_HOLD_MAX_MS} ms or ${ACK_HOLD_MAX_SEQS} messages)`,
        ),
      );
    if (this.#ws !== this.#heldWs || this.#state === 'closed') return;
    for (const h of sent) this.#write(h.frame);
  }

  #arm(deadline) {
    if (deadline === this.#armed) return;
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#armed = deadline;
    if (deadline === undefined) return;
    const ms = Math.min(2 ** 31 - 1, Math.max(0, Math.ceil(deadline - mono())));
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#armed = undefined;
      this.#eng.handleTimeout(mono(), Date.now());
      this.#pump();
    }, ms);
  }

  #write(frame) {
    const ws = this.#ws;
    if (!ws) return;
    this.#watchSend(ws); // bytes the socket took since the last look, before this frame's
    try {
      ws.send(frame);
    } catch {} // the socket is going away: its close event reports it
    if (ws.bufferedAmount > this.#sendLimit)
      this.#drop(ws, `the relay is not reading: ${ws.bufferedAmount} bytes unsent (limit ${this.#sendLimit})`);
    else this.#watchSend(ws);
  }

  /**
   * Watches socket `ws`'s unsent bytes (`bufferedAmount`, in browsers too). A relay that
   * stops reading, yet sends a frame now and then (a Ping resets the heartbeat), would
   * hold the connection for good under the send limit: publishes waiting over
   * `sendHighWaterMark`, QoS ≥ 1 publishes and flushes never settling, no failover. So
   * unsent bytes that do not shrink for `connectTimeoutMs` end the connection, as the
   * Rust client's stalled writes do, and the engine reconnects (or fails over).
   */
  #watchSend(ws) {
    const n = ws.bufferedAmount;
    const w = this.#stall;
    if (w?.ws === ws) {
      // Taken since the last look (or the buffer was empty then): the clock starts again.
      if (n < w.seen || w.seen === 0) w.since = mono();
      w.seen = n;
      return;
    }
    if (n === 0) return;
    if (w) clearTimeout(w.timer);
    const limit = this.#opts.connectTimeoutMs;
    const watch = (this.#stall = { ws, seen: n, since: mono(), timer: null });
    // Looked at four times per limit (a stall is seen within 1¼ limits), and only while
    // bytes stay unsent: nearly every frame is taken by the socket at once.
    const check = () => {
      watch.timer = null;
      if (this.#stall !== watch) return;
      this.#watchSend(ws);
      if (this.#ws !== ws || watch.seen === 0 || this.#state === 'closed') {
        this.#stall = null;
        return;
      }
      if (mono() - watch.since < limit) {
        watch.timer = setTimeout(check, limit / 4);
        return;
      }
      this.#drop(ws, `the relay is not reading: ${watch.seen} bytes unsent, none taken for ${limit} ms (connectTimeoutMs)`);
      this.#pump();
    };
    watch.timer = setTimeout(check, limit / 4);
  }

  /** Stops watching socket `ws` (any socket, `ws` not given). */
  #unwatch(ws) {
    if (!this.#stall || (ws && this.#stall.ws !== ws)) return;
    clearTimeout(this.#stall.timer);
    this.#stall = null;
  }

  /** Hangs up on socket `ws` for `why` (the engine hears it now, and dials again). */
  #drop(ws, why) {
    this.#unwatch(ws);
    for (const [id, s] of this.#sockets) {
      if (s !== ws) continue;
      this.#eng.handleDisconnected(id, why, mono(), Date.now());
      this.#again = true;
    }
    try {
      // `ws`'s terminate() drops the unsent bytes now; close() would first wait (up to
      // 30 s) for a relay that does not read to take them.
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close();
    } catch {}
  }

  #dial(id, relay) {
    const url = this.#urls[relay % this.#urls.length];
    this.#url = url;
    let ws;
    try {
      // The `ws` package refuses a message over the cap before buffering it (closing with
      // 1009); elsewhere the size is checked before the frame is copied into wasm memory.
      // `tls` (pins, extra roots) applies to wss:// only, as the Rust client's TlsPin/TlsRoot.
      const tls = this.#tls && /^wss:/i.test(url) ? this.#tls : undefined;
      // `closeTimeout`: a hang-up waits at most connectTimeoutMs for the relay's answer to
      // its Close (`ws` waits 30 s by default: a relay that stops reading kept Node alive).
      ws = wsOptions
        ? new WebSocketImpl(url, { maxPayload: this.#maxFrame, closeTimeout: this.#opts.connectTimeoutMs, ...tls })
        : new WebSocketImpl(url);
    } catch (e) {
      this.#eng.handleDisconnected(id, `cannot open ${url}: ${e.message}`, mono(), Date.now());
      this.#again = true;
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#ws = ws;
    this.#sockets.set(id, ws);
    let error = '';
    ws.onopen = () => {
      this.#eng.handleConnected(id, mono(), Date.now());
      this.#pump();
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer)) return; // the protocol is binary only
      if (ev.data.byteLength > this.#maxFrame) {
        // Copied into wasm memory it would grow it for good (wasm memory never shrinks).
        this.#drop(ws, `the relay sent a ${ev.data.byteLength}-byte frame, over maxFrame (${this.#maxFrame})`);
        this.#pump();
        return;
      }
      this.#eng.handleFrame(id, new Uint8Array(ev.data), mono(), Date.now());
      this.#pump();
    };
    ws.onerror = (ev) => {
      error = ev?.message ?? error;
    };
    ws.onclose = (ev) => {
      this.#sockets.delete(id);
      if (this.#ws === ws) this.#ws = null;
      const why = error
        ? `cannot reach relay at ${url}: ${error}`
        : `connection closed (${ev?.code ?? ''} ${ev?.reason ?? ''})`.trim();
      this.#eng.handleDisconnected(id, why, mono(), Date.now());
      this.#pump();
      if (this.#sockets.size === 0) for (const r of this.#closeWaiters.splice(0)) r();
    };
  }

  #hangup(id) {
    const ws = this.#sockets.get(id);
    if (!ws) return;
    if (this.#ws === ws) this.#ws = null;
    try {
      ws.close();
    } catch {}
  }

  #dispatch(e) {
    switch (e.type) {
      case 'message':
      case 'placeholder': {
        const s = this.#subs.get(e.sub);
        if (s) s._deliver(e.message, e.token);
        else this._ack(e.token);
        break;
      }
      case 'gap':
        // The relay dropped messages: for this (slow) connection — every at-most-once
        // subscription learns it — or, naming one, for that subscription (skipped while
        // paused, not kept by the store): the engine lists whose loss it is.
        for (const id of e.subs) this.#subs.get(id)?._lag(e.dropped);
        break;
      case 'dropped': {
        const s = this.#subs.get(e.sub);
        if (s) {
          s.dropped += e.n;
          s._lag(e.n);
        }
        break;
      }
      case 'replayDone':
        this.#subs.get(e.sub)?._replayDone(e.seq);
        break;
      case 'subscribed': {
        const p = this.#pendingSubs.get(e.sub);
        this.#pendingSubs.delete(e.sub);
        p?.resolve();
        break;
      }
      case 'subscribeFailed': {
        const err = wrapRelay(e.error);
        const p = this.#pendingSubs.get(e.sub);
        this.#pendingSubs.delete(e.sub);
        const s = this.#subs.get(e.sub);
        this.#subs.delete(e.sub);
        s?._end(err);
        if (p) p.reject(err);
        else if (s && !this.#closing) this._emit('error', err);
        break;
      }
      case 'puback': {
        const a = this.#acks.get(e.id);
        this.#acks.delete(e.id);
        a?.resolve(e.seq);
        break;
      }
      case 'publishFailed': {
        const a = this.#acks.get(e.id);
        this.#acks.delete(e.id);
        const err = wrapRelay(e.error);
        if (a) a.reject(err);
        else if (err.code !== 'CLOSED')
          // Nobody waits for it: a kept publish restored from the saved state (an earlier
          // run's). Said once, or its loss would go unnoticed.
          this._emit(
            'error',
            new WhispeerError(err.code, `a publish restored from the saved state failed, not sent again (id ${e.id}): ${err.message}`),
          );
        break;
      }
      case 'flushed':
      case 'flushFailed': {
        const d = this.#deletes.get(e.id);
        if (d) {
          this.#deletes.delete(e.id);
          d.reject(new WhispeerError('DISCONNECTED', 'the connection dropped before the relay answered the deletion'));
          break;
        }
        const f = this.#flushes.get(e.id);
        this.#flushes.delete(e.id);
        if (e.type === 'flushed') f?.resolve();
        else f?.reject(new WhispeerError('DISCONNECTED', 'not connected, or the connection dropped during flush'));
        break;
      }
      case 'durableDeleted': {
        const d = this.#deletes.get(e.id);
        this.#deletes.delete(e.id);
        if (e.code === undefined) d?.resolve();
        else d?.reject(new WhispeerError('REJECTED', `relay refused to delete the durable subscription: ${printable(e.message)} (${e.code})`));
        break;
      }
      case 'connected':
        this.#url = this.#urls[e.relay % this.#urls.length];
        this.#setState('connected', { url: this.#url });
        this.#first?.resolve();
        this.#first = null;
        break;
      case 'disconnected': {
        // The reason may carry the relay's text (its Close or Err message): shown printable,
        // as its `error` frames are.
        const reason = e.reason === undefined ? undefined : printable(e.reason);
        if (e.retryAt !== undefined) {
          if (this.#first) this.#setState('connecting', { attempt: e.attempt, reason });
          else this.#setState('reconnecting', { attempt: e.attempt, reason });
        } else {
          this.#first?.reject(new WhispeerError(e.code, reason));
          this.#first = null;
          this.#gaveUp = new WhispeerError('CLOSED', `gave up reconnecting: ${reason}`);
        }
        break;
      }
      case 'closed':
        this.#finish();
        break;
      case 'error':
        this._emit('error', new WhispeerError(e.code, `relay error: ${printable(e.message)}`));
        break;
      default:
        break;
    }
  }

  #gaveUp = null;

  #finish() {
    clearTimeout(this.#timer);
    this.#unwatch();
    clearTimeout(this.#waitingTimer);
    // Acks still waiting for the store go with the socket: the relay delivers their
    // messages again, and the saved window (once committed) refuses them as duplicates.
    clearTimeout(this.#heldTimer);
    this.#heldTimer = null;
    this.#heldAcks = [];
    this.#heldSeqs = 0;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#retryAt = 0; // the last save below is tried whatever the retry time
    this.#armed = undefined;
    const error = this.#gaveUp ?? new WhispeerError('CLOSED', 'client is closed');
    this.#setState('closed', this.#gaveUp ? { reason: this.#gaveUp.message } : undefined);
    for (const [, s] of this.#subs) s._end();
    this.#subs.clear();
    for (const [, p] of this.#pendingSubs) p.reject(error);
    this.#pendingSubs.clear();
    for (const [, a] of this.#acks) a.reject(error);
    this.#acks.clear();
    for (const [, d] of this.#deletes) d.reject(new WhispeerError('DISCONNECTED', 'the client closed before the relay answered the deletion'));
    this.#deletes.clear();
    for (const w of this.#waiting.splice(0)) w.reject(error);
    let storeClosed;
    if (this.#store) {
      const st = this.#store;
      this.#persist();
      this.#store = null;
      storeClosed = this.#gate.then(() => st.close());
    }
    Promise.resolve(storeClosed)
      .catch(() => {})
      .then(() => this.#endedResolve());
    if (this.#sockets.size === 0) for (const r of this.#closeWaiters.splice(0)) r();
  }

  /** @internal The app took a delivered message: its credit returns, its ack may leave. */
  _ack(token) {
    if (this.#state === 'closed') return;
    this.#eng.ack(token, mono(), Date.now());
    this.#pump();
  }

  #checkOpen() {
    if (this.#state === 'closed' || this.#closing) throw new WhispeerError('CLOSED', 'client is closed');
  }

  #overHighWater() {
    const ws = this.#ws;
    return !!ws && this.#state === 'connected' && ws.bufferedAmount > this.#opts.sendHighWaterMark;
  }

  /**
   * Hands a publish (`command`: the engine call, returning its publish id or undefined) to
   * the engine now, or — while the socket's send buffer is over `sendHighWaterMark` —
   * once it drains, in publish order. Resolves with the relay's sequence when the publish
   * waits for a PubAck, else undefined.
   */
  #submit(command) {
    if (this.#waiting.length === 0 && !this.#overHighWater()) return this.#hand(command);
    return new Promise((resolve, reject) => {
      this.#waiting.push({ command, resolve, reject });
      this.#pumpWaiting();
    });
  }

  #hand(command) {
    let id;
    try {
      id = command();
    } catch (e) {
      throw wrap(e);
    }
    const ack =
      id === undefined ? undefined : new Promise((resolve, reject) => this.#acks.set(id, { resolve, reject }));
    // Batch signing: publishes handed in the same turn of the event loop share one
    // signature — the frames leave in a microtask (or at once after BATCH_PUMP of them, so
    // the send buffer's high-water mark still holds back a synchronous loop).
    // With `persistence`, a publish that waits for its PubAck is sealed and saved before
    // `publish` returns (the outbox promise, README "Persistence"): it is pumped at once, so
    // such publishes are not batched under one signature.
    if (ack !== undefined && this.#store && this.#pumping) {
      // Published from inside a callback of the drain running now: sealed and saved here
      // (the drain goes on after the callback and sends it).
      this.#eng.sealPending();
      this.#persist();
      this.#again = true;
    } else if (
      (ack !== undefined && this.#store) ||
      ++this.#handed >= BATCH_PUMP ||
      this.#eng.batchBytes() >= BATCH_PUMP_BYTES
    )
      this.#pump();
    else if (!this.#pumpQueued) {
      this.#pumpQueued = true;
      queueMicrotask(() => {
        this.#pumpQueued = false;
        this.#pump();
      });
    }
    return ack;
  }

  #pumpWaiting() {
    if (this.#waitingTimer !== null) return;
    const step = () => {
      this.#waitingTimer = null;
      while (this.#waiting.length && !this.#overHighWater()) {
        const w = this.#waiting.shift();
        try {
          const ack = this.#hand(w.command);
          ack?.catch(() => {});
          w.resolve(ack);
        } catch (e) {
          w.reject(e);
        }
      }
      if (this.#waiting.length) this.#waitingTimer = setTimeout(step, 1);
    };
    this.#waitingTimer = setTimeout(step, 1);
  }

  /**
   * Publishes `value` (a plain JS value, encoded as CBOR) on `topic`. Waits while the
   * socket's send buffer is over `sendHighWaterMark` (default 1 MiB), in publish order.
   * `{ qos: 1 }` or `{ qos: 2 }`: the relay stores it and confirms; the publish is kept and
   * re-sent with the same id across reconnects until then, and resolves with the relay's
   * sequence number. `{ ack: true }` (QoS 0): resolves once the relay has it (fails with
   * NOT_ACKNOWLEDGED if the connection drops first). `{ retain: true }` keeps it as the
   * topic's retained value. `{ tree: TREE_ID }` (32 hex digits, a message's `treeId`) seals
   * with that tree's key: needed when grants of two trees cover the topic.
   */
  async publish(topic, value, options = {}) {
    this.#checkOpen();
    options = checkOptions('publish', options, PUBLISH_OPTIONS);
    this.#checkContentType(topic, 'application/cbor');
    return this.#submit(() => this.#eng.publish(topic, value, options, mono(), Date.now()));
  }

  /**
   * Publishes raw bytes with a content type (default `application/octet-stream`). On a
   * typed topic only its content type (`application/cbor; type="<tag>"`) is accepted.
   */
  async publishBytes(topic, bytes, options = {}) {
    this.#checkOpen();
    options = checkOptions('publishBytes', options, PUBLISH_BYTES_OPTIONS);
    const ct = options.contentType ?? 'application/octet-stream';
    this.#checkContentType(topic, ct);
    return this.#submit(() => this.#eng.publishBytes(topic, ct, bytes, options, mono(), Date.now()));
  }

  /** On a typed topic (registered with `topic`) only its tag's content type may be published. */
  #checkContentType(topic, contentType) {
    const t = this.#types.get(topic);
    if (t && contentType !== t.contentType)
      throw publishMismatch(topic, t.tag, contentType, ` (publish its values with client.topic(${JSON.stringify(topic)}, { type: ${JSON.stringify(t.tag)} }).publish)`);
  }

  /**
   * A typed topic: `options.type` is the tag of the one type it carries (a name the type
   * declares, e.g. `'myapp.MyData/v1'`, the Rust type's `#[whispeer(type = "…")]`).
   * Registers `name` (this exact topic) on this client: from now on an untyped `publish`
   * (untagged CBOR) or a `publishBytes` with another content type on it is refused with
   * `TYPE_MISMATCH`. Throws `INVALID_OPTION` for an unusable tag (1 to 128 bytes of
   * printable ASCII without quotes, backslashes or spaces), `INVALID_TOPIC`, and
   * `TYPE_MISMATCH` when `name` is already registered with another tag.
   */
  topic(name, options) {
    options = checkOptions('topic', options, TYPED_TOPIC_OPTIONS);
    const tag = options.type;
    if (typeof tag !== 'string')
      throw new WhispeerError('INVALID_OPTION', `topic: expected { type: 'tag' } (a string), got ${JSON.stringify(tag)}`);
    let contentType;
    try {
      contentType = typedTopic(name, tag);
    } catch (e) {
      throw wrap(e);
    }
    const had = this.#types.get(name);
    if (had && had.tag !== tag) throw publishMismatch(name, had.tag, tag);
    if (!had) this.#types.set(name, { tag, contentType });
    return new TypedTopic(this, name, tag, contentType);
  }

  /** @internal `TypedTopic.publish`. */
  async _publishTyped(typed, value, options = {}) {
    this.#checkOpen();
    options = checkOptions('publish', options, PUBLISH_OPTIONS);
    this.#checkContentType(typed.name, typed.contentType);
    return this.#submit(() =>
      this.#eng.publishBytes(typed.name, typed.contentType, encodeValue(value), options, mono(), Date.now()),
    );
  }

  /** @internal `TypedTopic.subscribe`. */
  async _subscribeTyped(typed, callback, options) {
    return this.#subscribe(typed.name, callback, options, TYPED_SUBSCRIBE_OPTIONS, typed);
  }

  /**
   * Clears `topic`'s retained value (PROTOCOL §4.11): publishes a sealed, signed, empty
   * *clear* with `retain` that replaces it on the relay, and resolves with the relay's
   * sequence once the relay has it. Receivers never deliver a clear: a live subscriber sees
   * nothing, a later one gets no retained value for the topic. Options: `qos`, `tree`.
   */
  async clearRetained(topic, options = {}) {
    this.#checkOpen();
    options = checkOptions('clearRetained', options, ['qos', 'tree']);
    const opts = { ...options, retain: true, ack: true };
    return this.#submit(() => this.#eng.publishBytes(topic, CLEAR_RETAINED, new Uint8Array(0), opts, mono(), Date.now()));
  }

  /**
   * Subscribes to `filter` (`+` one level, `#` the rest). With a callback, calls it for
   * every message; without, the returned Subscription is an async iterator. Options:
   * `qos` (1: at least once — what the app has not taken is redelivered), `replay`
   * (`{ fromSeq }`, `{ sinceMs }` or `{ last }`), `durable` (a name the relay remembers
   * the position under), `retained` (default true), `capacity`, `tree` (32 hex digits:
   * the one tree whose messages it gets — needed when grants of several trees overlap the
   * filter, else it fails with code `KEY` naming them), `onLag`, `onReplayDone`.
   * Resolves once the relay confirmed the subscription; while reconnecting, once it is
   * confirmed on the next connection (as in the Rust client), so a message published after
   * it resolves is delivered.
   */
  async subscribe(filter, callback, options = {}) {
    return this.#subscribe(filter, callback, options, SUBSCRIBE_OPTIONS, undefined);
  }

  async #subscribe(filter, callback, options, known, typed) {
    this.#checkOpen();
    if (callback !== undefined && typeof callback !== 'function') {
      options = callback ?? {};
      callback = undefined;
    }
    options = checkOptions('subscribe', options, known);
    const id = this.#nextSub++;
    try {
      this.#eng.subscribe(id, filter, options, mono(), Date.now()); // NO_KEY / INVALID_TOPIC / KEY
    } catch (e) {
      throw wrap(e);
    }
    const sub = new Subscription(this, id, filter, callback, options, typed);
    this.#subs.set(id, sub);
    // Like the Rust client: while reconnecting, the engine sends the Sub on the next
    // connection and this resolves at its SubOk (rejects if the client closes first).
    const ready = new Promise((resolve, reject) => this.#pendingSubs.set(id, { resolve, reject }));
    this.#pump();
    await ready;
    return sub;
  }

  /** @internal */
  async _deleteDurable(id) {
    if (this.#state === 'closed') throw new WhispeerError('DISCONNECTED', 'the client is closed');
    let fid;
    try {
      fid = this.#eng.deleteDurable(id, mono(), Date.now());
    } catch (e) {
      throw wrap(e);
    }
    const sub = this.#subs.get(id);
    this.#subs.delete(id);
    this.#pendingSubs.delete(id);
    const p = new Promise((resolve, reject) => this.#deletes.set(fid, { resolve, reject }));
    this.#pump();
    try {
      return await p;
    } finally {
      // Gone from the client (nothing else would end it): ended whatever the answer, or
      // an iterator over it would wait forever.
      sub?._end();
    }
  }

  /** @internal */
  _unsubscribe(id) {
    if (!this.#subs.delete(id)) return;
    this.#pendingSubs.delete(id);
    if (this.#state === 'closed') return;
    this.#eng.unsubscribe(id);
    this.#pump();
  }

  /**
   * Adds keys at run time (new grants, a rotated epoch, zstd dictionaries, an accepted
   * invite's grant and dictionaries) and refreshes subscriptions.
   *
   * Each grant is accepted or refused on its own: a refused one does not stop the others
   * (a rotation's grant after a stale one of the same Keyring still arrives), and the
   * first refusal is thrown once the rest is added. An invite's dictionaries are added
   * only when its grant is accepted (PROTOCOL §7: a refused invite adds nothing). A
   * Keyring's grant the client already supersedes (a delegated grant contradicted by a
   * held one) is skipped, as the keyring would have dropped it. An invite whose new
   * dictionaries would pass the 256-dictionary bound is refused whole (its grant is not
   * added). `wsdict1…` strings serve the trees of the call's tree keys and grants, or
   * every tree when the call holds dictionaries only (PROTOCOL §4.6.1).
   */
  addKeys(keys) {
    this.#checkOpen();
    let plan;
    try {
      plan = keysToAdd(keys);
    } catch (e) {
      throw wrap(e);
    }
    let refused;
    for (const { grant, dictionaries, fromKeyring } of plan.grants) {
      try {
        // An invite whose dictionaries would pass the keyring's bound (256) is refused
        // whole, before its grant is added (PROTOCOL §7, as `Keyring::accept_invite_at`).
        if (dictionaries.length > 0) this.#eng.checkDictionaryRoom(dictionaries);
        // `false`: ignored (its epoch is older than every epoch held of its tree), so an
        // invite's dictionaries are not added either (PROTOCOL §7).
        if (!this.#eng.addGrant(grant, mono(), Date.now())) continue;
      } catch (e) {
        if (!(fromKeyring && superseded(e))) refused ??= e;
        continue;
      }
      try {
        for (const d of dictionaries) this.#eng.addDictionary(d, grant.treeId);
      } catch (e) {
        refused ??= e;
      }
    }
    try {
      for (const { dictionary, treeId } of plan.dictionaries) this.#eng.addDictionary(dictionary, treeId);
    } catch (e) {
      refused ??= e;
    }
    this.#pump();
    if (refused) throw wrap(refused);
  }

  /**
   * Lets this client seal with the delegated grant(s) for `scope` (`#`, `a/#` or `a/b`) in
   * tree `treeId` (32 hex digits): a grant narrowed by someone the keyring cannot verify opens
   * messages but seals only after this opt-in.
   */
  allowSealing(treeId, scope) {
    try {
      this.#eng.allowSealing(treeId, scope);
    } catch (e) {
      throw wrap(e);
    }
  }

  /**
   * Resolves once the relay has processed everything sent before (a Ping/Pong round trip),
   * acks of what the app took included: with persistence, Acks held for a state write
   * (in flight, or failed and not yet written again) leave first — the flush's Ping waits
   * behind them, at most ACK_HOLD_MAX_MS.
   */
  flush() {
    if (this.#state === 'closed') return Promise.reject(new WhispeerError('DISCONNECTED', 'not connected'));
    const id = this.#eng.flush(mono(), Date.now());
    const p = new Promise((resolve, reject) => this.#flushes.set(id, { resolve, reject }));
    this.#pump();
    return p;
  }

  /**
   * Flushes, says goodbye to the relay and closes. Subscriptions end. Every call resolves
   * when the client has closed (a second one does not return before the first is done).
   */
  close() {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  async #close() {
    // Closed by itself (it gave up, or the relay closed it): done once its end is — its
    // state store released — so a `closed` listener that awaits close() and reopens the
    // same store finds it free (review: it resolved at once, before the store closed).
    if (this.#closing || this.#state === 'closed') return this.#ended;
    // The flush waits at most connectTimeoutMs: a relay that keeps sending (any frame is a
    // heartbeat) but never answers its Ping must not keep close() from ending.
    let bound;
    const flushed = this.flush();
    flushed.catch(() => {}); // settled after the race too: no unhandled rejection
    try {
      await Promise.race([
        flushed,
        new Promise((r) => {
          bound = setTimeout(r, this.#opts.connectTimeoutMs);
        }),
      ]);
    } catch {}
    clearTimeout(bound);
    if (this.#closing || this.#state === 'closed') return this.#ended;
    this.#closing = true;
    if (this.#heldAcks.length > 0 && this.#repair) {
      // A failed write is tried once more now, so that the Acks it holds back leave before
      // the Close (still failing, they go with the socket: the relay delivers again).
      this.#retryAt = 0;
      this.#pump();
      this.#sendHeldAcks(false);
    }
    const closed = this.#sockets.size ? new Promise((r) => this.#closeWaiters.push(r)) : undefined;
    this.#eng.close(mono(), Date.now());
    this.#pump();
    // The close handshake too is waited for at most connectTimeoutMs: a relay that does not
    // read never answers the Close. Sockets still open are then cut (`ws`: terminate(); a
    // browser's WebSocket finishes closing on its own).
    if (closed) {
      let cut;
      await Promise.race([
        closed,
        new Promise((r) => {
          cut = setTimeout(r, this.#opts.connectTimeoutMs);
        }),
      ]);
      clearTimeout(cut);
      for (const ws of this.#sockets.values())
        try {
          if (typeof ws.terminate === 'function') ws.terminate();
        } catch {}
    }
    // The sockets are gone; the client's end (and its store's close) may still wait for a
    // state write in flight (an IndexedDB transaction).
    await this.#ended;
  }
}
