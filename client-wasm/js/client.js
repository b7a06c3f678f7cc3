// The JS half of the whispeer client: it owns the WebSocket, the timers (heartbeat,
// reconnect backoff) and the callbacks. Everything about messages — keys, sealing,
// opening, frames, subscriptions, dedup — happens in the Rust core (ClientCore, wasm).

import { ClientCore, Keyring, TreeKey, Grant, Identity } from '../pkg/whispeer_wasm.js';

let WebSocketImpl = globalThis.WebSocket;

/** Used by the Node entry point to supply the `ws` package. */
export function setWebSocket(impl) {
  WebSocketImpl = impl;
}

/** Wraps a number so it is always encoded as a CBOR float (for Rust `f32`/`f64` fields). */
export function float(x) {
  return { __whispeerFloat: Number(x) };
}

/** The error class of every error the client itself raises (`code` names the cause). */
export class WhispeerError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'WhispeerError';
    this.code = code;
  }
}

const DEFAULT_RECONNECT = {
  initialDelayMs: 100,
  maxDelayMs: 5000,
  factor: 2,
  jitter: 0.2,
  maxAttempts: Infinity,
};

/** Builds a Keyring from a Keyring, TreeKey, Grant, key string, or an array of those. */
export function toKeyring(keys) {
  const kr = new Keyring();
  addKeys(kr, keys);
  return kr;
}

function addKeys(kr, keys) {
  for (const k of Array.isArray(keys) ? keys : keys == null ? [] : [keys]) {
    if (k instanceof Keyring) for (const s of k.toKeyStrings()) kr.addKeyString(s);
    else if (k instanceof TreeKey) kr.addTreeKey(k);
    else if (k instanceof Grant) kr.addGrant(k);
    else if (typeof k === 'string') kr.addKeyString(k);
    else throw new TypeError('keys: expected a Keyring, TreeKey, Grant or key string');
  }
}

function grantsOf(keys) {
  const out = [];
  for (const k of Array.isArray(keys) ? keys : [keys]) {
    if (k instanceof Keyring) for (const s of k.toKeyStrings()) out.push(Grant.fromKeyString(s));
    else if (k instanceof TreeKey) out.push(k.grant('#'));
    else if (k instanceof Grant) out.push(k);
    else if (typeof k === 'string')
      out.push(k.trim().startsWith('wstree1') ? TreeKey.fromKeyString(k).grant('#') : Grant.fromKeyString(k));
    else throw new TypeError('keys: expected a Keyring, TreeKey, Grant or key string');
  }
  return out;
}

function level(c) {
  if (c === undefined || c === true || c === 'zstd') return 3;
  if (c === false || c === null || c === 'none' || c === 0) return 0;
  if (typeof c === 'number') return c;
  if (typeof c === 'object' && typeof c.zstd === 'number') return c.zstd;
  throw new TypeError(`compression: expected 'zstd', 'none', a level or { zstd: level }, got ${c}`);
}

/** A subscription: a callback target, or an async iterator of messages. */
export class Subscription {
  #client;
  #callback;
  #queue = [];
  #waiters = [];
  #ended = false;
  #capacity;

  #onLag;

  constructor(client, id, filter, callback, capacity, onLag) {
    this.#client = client;
    this.id = id;
    this.filter = filter;
    this.#callback = callback;
    this.#capacity = capacity;
    this.#onLag = onLag;
    /** Messages dropped because the iterator was not read fast enough. */
    this.dropped = 0;
    /** Messages lost in all (dropped here, or by the relay for a slow connection). */
    this.lost = 0;
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

  /** @internal */
  _deliver(msg) {
    if (this.#ended) return;
    if (this.#callback) {
      try {
        const r = this.#callback(msg);
        if (r && typeof r.then === 'function') r.then(undefined, (e) => this.#client._emit('error', e));
      } catch (e) {
        this.#client._emit('error', e);
      }
      return;
    }
    const w = this.#waiters.shift();
    if (w) w.resolve({ value: msg, done: false });
    else if (this.#queue.length < this.#capacity) this.#queue.push(msg);
    else {
      this.dropped++;
      this._lag(1);
    }
  }

  /** @internal */
  _end(error) {
    if (this.#ended) return;
    this.#ended = true;
    for (const w of this.#waiters.splice(0)) {
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

  /** The next message (`{ value, done }`), for the async-iterator protocol. */
  next() {
    if (this.#queue.length) return Promise.resolve({ value: this.#queue.shift(), done: false });
    if (this.#ended) return Promise.resolve({ value: undefined, done: true });
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
 * A client connected to one relay. Publish and subscribe with plain JS values; the
 * connection reconnects with backoff and resubscribes on its own.
 */
export class Client {
  #url;
  #opts;
  #core;
  #name;
  #ws = null;
  #state = 'connecting';
  #listeners = new Map();
  #subs = new Map();
  #pendingSubs = new Map(); // local id -> { relayIds: Set, resolve, reject }
  #acks = new Map(); // publish id (hex) -> { resolve, reject }
  #flushes = new Map(); // nonce -> { resolve, reject }
  #outbox = [];
  #outboxBytes = 0;
  #nextSub = 1;
  #nextNonce = 1;
  #heartbeat = null;
  #unanswered = 0;
  #reconnectTimer = null;
  #attempt = 0;
  #reconnects = 0;
  #closing = false;
  #identity;
  #waiting = []; // publishes held while the socket's send buffer is over the high-water mark
  #pumping = false;

  /** Connects (the first attempt must succeed) and returns a ready client. */
  static async connect(url, options = {}) {
    const c = new Client(url, options);
    await c.#open();
    c.#setState('connected');
    return c;
  }

  /** Use `Client.connect`. */
  constructor(url, options = {}) {
    if (typeof url !== 'string' || !/^wss?:\/\//.test(url))
      throw new WhispeerError('INVALID_URL', `relay URL must be ws:// or wss://, got ${url}`);
    if (!WebSocketImpl) throw new WhispeerError('NO_WEBSOCKET', 'no WebSocket implementation available');
    this.#url = url;
    this.#opts = {
      connectTimeoutMs: 10_000,
      reconnectBuffer: 8 * 1024 * 1024,
      subscriptionCapacity: 65_536,
      sendHighWaterMark: 1024 * 1024,
      ...options,
      reconnect: { ...DEFAULT_RECONNECT, ...(options.reconnect ?? {}) },
    };
    this.#name = options.name ?? 'whispeer-js/0.1.0';
    const kr = options.keys instanceof Keyring ? options.keys : toKeyring(options.keys);
    this.#core = new ClientCore(kr, level(options.compression), options.padding !== false, options.sign !== false);
    if (options.identity) {
      if (!(options.identity instanceof Identity))
        throw new TypeError('identity: expected an Identity (Identity.generate() or Identity.fromSecretString())');
      this.#core.setIdentity(options.identity);
      this.#identity = options.identity;
    }
    for (const [filter, o] of Object.entries(options.topics ?? {})) {
      this.#core.setTopicOptions(filter, level(o.compression), o.padding !== false);
    }
    // Relay account (auth = required relays): an account key answers the relay's challenge;
    // a bearer token rides in Hello. Never the identity that signs messages.
    if (options.auth != null) {
      const a = options.auth;
      if (typeof a.key === 'string') this.#core.setAccountKey(a.key);
      else if (typeof a.token === 'string') this.#core.setAuthToken(a.token);
      else throw new TypeError("auth: expected { key: 'wsp_acct_sk_…' } or { token: '…' }");
    }
  }

  /** `connecting`, `connected`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The relay URL. */
  get url() {
    return this.#url;
  }

  /** This client's sender id (`wspk1…`), or null without an identity. */
  get senderId() {
    return this.#identity ? this.#identity.senderId : null;
  }

  /** Bytes the socket has not sent yet (what `publish` waits on above `sendHighWaterMark`). */
  get bufferedAmount() {
    return this.#ws ? this.#ws.bufferedAmount : 0;
  }

  /** Counters: delivered, rejected (could not open), duplicates, relayGaps, reconnects. */
  stats() {
    return { ...this.#core.stats(), reconnects: this.#reconnects, outboxBytes: this.#outboxBytes };
  }

  /**
   * Listens to `state` (new state, detail) or `error` (errors thrown by callbacks).
   * Returns a function that removes the listener.
   */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.#listeners.get(event)?.delete(fn);
  }

  /** @internal */
  _emit(event, ...args) {
    const ls = this.#listeners.get(event);
    if (!ls || ls.size === 0) {
      if (event === 'error') console.error('whispeer:', args[0]);
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

  /** Resolves once the state is `state` (immediately if it already is). */
  waitForState(state) {
    if (this.#state === state) return Promise.resolve();
    return new Promise((resolve) => {
      const off = this.on('state', (s) => {
        if (s === state) {
          off();
          resolve();
        }
      });
    });
  }

  #setState(s, detail) {
    if (this.#state === s && s !== 'reconnecting') return;
    this.#state = s;
    this._emit('state', s, detail);
  }

  // One connection attempt: socket, Hello, Welcome, resubscribe, outbox.
  #open() {
    return new Promise((resolve, reject) => {
      let settled = false;
      let ws;
      try {
        ws = new WebSocketImpl(this.#url);
      } catch (e) {
        reject(new WhispeerError('CONNECT', `cannot open ${this.#url}: ${e.message}`));
        return;
      }
      ws.binaryType = 'arraybuffer';
      const fail = (why) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        try {
          ws.close();
        } catch {}
        reject(why instanceof Error ? why : new WhispeerError('CONNECT', why));
      };
      const timer = setTimeout(
        () => fail(new WhispeerError('TIMEOUT', `relay did not answer within ${this.#opts.connectTimeoutMs} ms`)),
        this.#opts.connectTimeoutMs,
      );
      ws.onopen = () => ws.send(this.#core.hello(this.#name));
      ws.onerror = (ev) => fail(`cannot reach relay at ${this.#url}${ev?.message ? ': ' + ev.message : ''}`);
      ws.onclose = (ev) => {
        if (!settled) fail(`connection closed during handshake (${ev?.code ?? ''})`);
        else if (this.#ws === ws) this.#lost(`connection closed (${ev?.code ?? ''} ${ev?.reason ?? ''})`.trim());
      };
      ws.onmessage = (ev) => {
        if (!(ev.data instanceof ArrayBuffer)) return; // the protocol is binary only
        let e;
        try {
          e = this.#core.handle(new Uint8Array(ev.data));
        } catch (err) {
          if (!settled) fail(err);
          else if (this.#ws === ws) {
            this.#ws = null;
            ws.close();
            this.#lost(err.message);
          }
          return;
        }
        if (settled) {
          if (this.#ws === ws) this.#dispatch(e);
          return;
        }
        if (e.type === 'challenge') {
          ws.send(e.reply);
        } else if (e.type === 'welcome') {
          settled = true;
          clearTimeout(timer);
          this.#ws = ws;
          this.#unanswered = 0;
          // Re-establish every subscription, then send what was buffered while offline.
          for (const f of this.#core.resubscribeAll()) ws.send(f);
          for (const f of this.#outbox) ws.send(f);
          this.#outbox = [];
          this.#outboxBytes = 0;
          this.#startHeartbeat(e.heartbeatMs || 30_000);
          resolve();
        } else if (e.type === 'error' || e.type === 'close') {
          fail(new WhispeerError('REJECTED', `relay refused the connection: ${e.message} (${e.code})`));
        }
      };
    });
  }

  #startHeartbeat(ms) {
    clearInterval(this.#heartbeat);
    this.#heartbeat = setInterval(() => {
      if (this.#unanswered >= 2) {
        const ws = this.#ws;
        this.#ws = null;
        ws?.close();
        this.#lost('relay stopped answering pings');
        return;
      }
      this.#unanswered++;
      this.#send(this.#core.ping(0));
    }, ms);
    this.#heartbeat.unref?.();
  }

  #lost(reason) {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
    this.#ws = null;
    for (const [, f] of this.#flushes) f.reject(new WhispeerError('DISCONNECTED', 'connection lost during flush'));
    this.#flushes.clear();
    for (const [, a] of this.#acks)
      a.reject(new WhispeerError('NOT_ACKNOWLEDGED', 'connection lost before the relay acknowledged the message'));
    this.#acks.clear();
    // Pending subscriptions are re-sent with the others once reconnected.
    for (const [, p] of this.#pendingSubs) p.resolve();
    this.#pendingSubs.clear();
    if (this.#closing || this.#state === 'closed') return;
    this.#attempt = 0;
    this.#scheduleReconnect(reason);
  }

  #scheduleReconnect(reason) {
    const r = this.#opts.reconnect;
    this.#attempt++;
    if (this.#attempt > r.maxAttempts) {
      this.#finish(new WhispeerError('CLOSED', `gave up reconnecting: ${reason}`));
      return;
    }
    this.#setState('reconnecting', { attempt: this.#attempt, reason });
    const base = Math.min(r.maxDelayMs, r.initialDelayMs * r.factor ** (this.#attempt - 1));
    const delay = base * (1 - r.jitter + 2 * r.jitter * Math.random());
    this.#reconnectTimer = setTimeout(async () => {
      this.#reconnectTimer = null;
      if (this.#closing) return;
      try {
        await this.#open();
      } catch (e) {
        if (!this.#closing) this.#scheduleReconnect(e.message);
        return;
      }
      if (this.#closing) {
        // close() ran while this attempt was in its handshake: hang up, do not keep it.
        clearInterval(this.#heartbeat);
        this.#heartbeat = null;
        const ws = this.#ws;
        this.#ws = null;
        ws?.close();
        return;
      }
      this.#reconnects++;
      this.#attempt = 0;
      this.#setState('connected');
    }, delay);
  }

  #finish(error) {
    clearInterval(this.#heartbeat);
    clearTimeout(this.#reconnectTimer);
    this.#setState('closed', error ? { reason: error.message } : undefined);
    for (const [, s] of this.#subs) s._end();
    this.#subs.clear();
    for (const [, p] of this.#pendingSubs) p.reject(error ?? new WhispeerError('CLOSED', 'client is closed'));
    this.#pendingSubs.clear();
    for (const [, a] of this.#acks) a.reject(error ?? new WhispeerError('CLOSED', 'client is closed'));
    this.#acks.clear();
  }

  #send(frame) {
    if (this.#ws && this.#state === 'connected') {
      this.#ws.send(frame);
      return true;
    }
    return false;
  }

  #dispatch(e) {
    switch (e.type) {
      case 'message':
        for (const id of e.subs) this.#subs.get(id)?._deliver(e.message);
        break;
      case 'gap':
        // The relay dropped messages for this (slow) connection: every subscription is at
        // most once here, and each learns it.
        for (const sub of this.#subs.values()) sub._lag(e.dropped);
        break;
      case 'subok': {
        const p = this.#pendingSubs.get(e.sub);
        if (p) {
          p.relayIds.delete(e.relayId);
          if (p.relayIds.size === 0) {
            this.#pendingSubs.delete(e.sub);
            p.resolve();
          }
        }
        break;
      }
      case 'puback': {
        const a = this.#acks.get(e.publishId);
        if (a) {
          this.#acks.delete(e.publishId);
          a.resolve(e.seq);
        }
        break;
      }
      case 'pong': {
        this.#unanswered = 0;
        const f = this.#flushes.get(e.nonce);
        if (f) {
          this.#flushes.delete(e.nonce);
          f.resolve();
        }
        break;
      }
      case 'ping':
        this.#send(e.reply);
        break;
      case 'error': {
        const err = new WhispeerError(e.code, `relay error: ${e.message}`);
        if (e.publishId && this.#acks.has(e.publishId)) {
          this.#acks.get(e.publishId).reject(err);
          this.#acks.delete(e.publishId);
        }
        if (e.sub !== undefined && this.#pendingSubs.has(e.sub)) {
          this.#pendingSubs.get(e.sub).reject(err);
          this.#pendingSubs.delete(e.sub);
          this.#subs.delete(e.sub);
          this.#core.unsubscribe(e.sub);
        }
        if (e.fatal) {
          const ws = this.#ws;
          this.#ws = null;
          ws?.close();
          this.#lost(err.message);
        }
        break;
      }
      case 'close': {
        const ws = this.#ws;
        this.#ws = null;
        ws?.close();
        this.#lost(`relay closed the connection: ${e.message} (${e.code})`);
        break;
      }
      default:
        break; // dropped (could not open / duplicate / no match), gap, ignored
    }
  }

  #checkOpen() {
    if (this.#state === 'closed' || this.#closing) throw new WhispeerError('CLOSED', 'client is closed');
  }

  #queue(frame) {
    if (this.#send(frame)) return;
    if (this.#outboxBytes + frame.length > this.#opts.reconnectBuffer)
      throw new WhispeerError(
        'BUFFER_FULL',
        `not connected and the reconnect buffer (${this.#opts.reconnectBuffer} bytes) is full`,
      );
    this.#outbox.push(frame);
    this.#outboxBytes += frame.length;
  }

  #overHighWater() {
    const ws = this.#ws;
    return !!ws && this.#state === 'connected' && ws.bufferedAmount > this.#opts.sendHighWaterMark;
  }

  /**
   * Sends (or buffers while reconnecting) a sealed frame; while the socket's send buffer is
   * over `sendHighWaterMark`, waits, in publish order.
   */
  #submit(frame) {
    if (this.#waiting.length === 0 && !this.#overHighWater()) {
      this.#queue(frame);
      return undefined;
    }
    return new Promise((resolve, reject) => {
      this.#waiting.push({ frame, resolve, reject });
      this.#pumpWaiting();
    });
  }

  #pumpWaiting() {
    if (this.#pumping) return;
    this.#pumping = true;
    const step = () => {
      while (this.#waiting.length && !this.#overHighWater()) {
        const w = this.#waiting.shift();
        try {
          this.#queue(w.frame);
          w.resolve();
        } catch (e) {
          w.reject(e);
        }
      }
      if (this.#waiting.length) setTimeout(step, 1);
      else this.#pumping = false;
    };
    setTimeout(step, 1);
  }

  #ackPromise(out) {
    if (out.length < 2) return undefined;
    return new Promise((resolve, reject) => this.#acks.set(out[1], { resolve, reject }));
  }

  /**
   * Publishes `value` (a plain JS value, encoded as CBOR) on `topic`. Resolves once handed to
   * the connection (or buffered while reconnecting), after waiting while the socket's send
   * buffer is over `sendHighWaterMark` (default 1 MiB); with `{ ack: true }` once the relay has
   * it, with the relay's sequence number. `{ retain: true }` keeps it as the topic's
   * retained value. `{ tree: TREE_ID }` (32 hex digits, a message's `treeId`) seals with that
   * tree's key: needed when grants of two trees cover the topic (a publish without it then
   * fails with code `KEY`, naming both trees).
   */
  async publish(topic, value, options = {}) {
    this.#checkOpen();
    const out = this.#core.publish(
      topic,
      value,
      !!options.retain,
      !!options.ack,
      options.tree ?? undefined,
    );
    const ack = this.#ackPromise(out);
    ack?.catch(() => {}); // the caller handles it once returned; not "unhandled" meanwhile
    try {
      await this.#submit(out[0]);
    } catch (e) {
      this.#acks.delete(out[1]);
      throw e;
    }
    return ack ? ack : undefined;
  }

  /** Publishes raw bytes with a content type (default `application/octet-stream`). */
  async publishBytes(topic, bytes, options = {}) {
    this.#checkOpen();
    const out = this.#core.publishBytes(
      topic,
      options.contentType ?? 'application/octet-stream',
      bytes,
      !!options.retain,
      !!options.ack,
      options.tree ?? undefined,
    );
    const ack = this.#ackPromise(out);
    ack?.catch(() => {}); // the caller handles it once returned; not "unhandled" meanwhile
    try {
      await this.#submit(out[0]);
    } catch (e) {
      this.#acks.delete(out[1]);
      throw e;
    }
    return ack ? ack : undefined;
  }

  /**
   * Subscribes to `filter` (`+` one level, `#` the rest). With a callback, calls it for
   * every message; without, the returned Subscription is an async iterator. Resolves once
   * the relay confirmed the subscription (or immediately while reconnecting).
   */
  async subscribe(filter, callback, options = {}) {
    this.#checkOpen();
    if (callback !== undefined && typeof callback !== 'function') {
      options = callback ?? {};
      callback = undefined;
    }
    const id = this.#nextSub++;
    const frames = this.#core.subscribe(id, filter); // throws NO_KEY / INVALID_TOPIC
    const sub = new Subscription(
      this,
      id,
      filter,
      callback,
      options.capacity ?? this.#opts.subscriptionCapacity,
      options.onLag,
    );
    this.#subs.set(id, sub);
    if (this.#state !== 'connected' || !this.#ws) return sub; // sent on reconnect
    const ready = new Promise((resolve, reject) => {
      this.#pendingSubs.set(id, { relayIds: new Set(this.#core.relayIds(id)), resolve, reject });
    });
    for (const f of frames) this.#ws.send(f);
    await ready;
    return sub;
  }

  /** @internal */
  _unsubscribe(id) {
    if (!this.#subs.delete(id)) return;
    this.#pendingSubs.delete(id);
    const frames = this.#core.unsubscribe(id);
    for (const f of frames) this.#send(f);
  }

  /** Adds keys at run time (new grants, a rotated epoch) and refreshes subscriptions. */
  addKeys(keys) {
    for (const g of grantsOf(keys)) this.#core.addGrant(g);
    const frames = this.#core.refreshSubscriptions([...this.#subs.keys()]);
    if (this.#state === 'connected') for (const f of frames) this.#send(f);
  }

  /**
   * Lets this client seal with the delegated grant(s) for `scope` (`#`, `a/#` or `a/b`) in
   * tree `treeId` (32 hex digits): a grant narrowed by someone the keyring cannot verify opens
   * messages but seals only after this opt-in.
   */
  allowSealing(treeId, scope) {
    this.#core.allowSealing(treeId, scope);
  }

  /** Resolves once the relay has processed everything sent before (a Ping/Pong round trip). */
  flush() {
    if (this.#state !== 'connected' || !this.#ws)
      return Promise.reject(new WhispeerError('DISCONNECTED', 'not connected'));
    const nonce = this.#nextNonce++;
    return new Promise((resolve, reject) => {
      this.#flushes.set(nonce, { resolve, reject });
      this.#ws.send(this.#core.ping(nonce));
    });
  }

  /** Flushes, says goodbye to the relay and closes. Subscriptions end. */
  async close() {
    if (this.#closing || this.#state === 'closed') return;
    try {
      await this.flush();
    } catch {}
    this.#closing = true;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      try {
        ws.send(this.#core.closeFrame());
      } catch {}
      const closed = new Promise((resolve) => {
        ws.onclose = () => resolve();
        ws.onerror = () => resolve();
      });
      ws.close();
      await closed;
    }
    this.#finish();
  }
}
