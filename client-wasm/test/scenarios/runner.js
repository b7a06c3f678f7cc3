// Runs one scenario of the shared suite (tests/scenarios/*.json, format in its README.md)
// with the npm package against the real relay binary — the JavaScript twin of the Rust
// runner (client/tests/scenarios.rs). Throws a ScenarioError naming the failing step.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRelay } from '../shared/relay.js';
import { startFaultProxy } from './fault-proxy.js';
import { makeActors } from './actors.js';
import * as W from '../../js/index.node.js';

/** How long one wait may take before the scenario fails (only a broken run gets there). */
const DEADLINE_MS = 60_000;

/** How long an expectation waits for its client's flush at most. */
const SETTLE_MS = 5_000;

export class ScenarioError extends Error {
  constructor(step, message) {
    super(message);
    this.name = 'ScenarioError';
    /** The index of the failing step (-1: the file or the relay section). */
    this.step = step;
  }
}

/** A step's keys, each read at most once; unknown keys are an error. */
class Step {
  constructor(obj) {
    this.obj = obj;
    this.used = new Set(['do', 'note']);
  }
  #get(k, type, what) {
    this.used.add(k);
    const v = this.obj[k];
    if (v === undefined) return undefined;
    if (type === 'count' ? !(Number.isSafeInteger(v) && v >= 0) : typeof v !== type)
      throw new Error(`"${k}" must be ${what}`);
    return v;
  }
  str(k) {
    const v = this.optStr(k);
    if (v === undefined) throw new Error(`missing "${k}"`);
    return v;
  }
  optStr(k) {
    return this.#get(k, 'string', 'a string');
  }
  optU64(k) {
    return this.#get(k, 'count', 'a count');
  }
  optBool(k) {
    return this.#get(k, 'boolean', 'a boolean');
  }
  opt(k) {
    this.used.add(k);
    return this.obj[k];
  }
  done() {
    const extra = Object.keys(this.obj).find((k) => !this.used.has(k));
    if (extra !== undefined) throw new Error(`unknown key "${extra}"`);
  }
}

function qos(n = 0) {
  if (n !== 0 && n !== 1 && n !== 2) throw new Error(`qos ${n} is not 0, 1 or 2`);
  return n;
}

function ranges(v) {
  if (!Array.isArray(v)) throw new Error('a message list is an array of ranges');
  const out = [];
  for (const r of v) {
    if (typeof r.topic !== 'string' || !Number.isSafeInteger(r.from) || !Number.isSafeInteger(r.to))
      throw new Error('a range needs "topic", "from", "to"');
    for (let i = r.from; i <= r.to; i++) out.push([r.topic, i]);
  }
  return out;
}

const key = ([t, i]) => `${t}:${i}`;

/** Runs of consecutive indices on one topic, so a long list stays readable. */
function show(list) {
  const parts = [];
  for (let i = 0; i < list.length; ) {
    let j = i;
    while (j + 1 < list.length && list[j + 1][0] === list[i][0] && list[j + 1][1] === list[j][1] + 1) j++;
    parts.push(i === j ? key(list[i]) : `${list[i][0]}:${list[i][1]}..=${list[j][1]}`);
    i = j + 1;
  }
  return `[${parts.join(', ')}]`;
}

const sameList = (a, b) => a.length === b.length && a.every((x, k) => x[0] === b[k][0] && x[1] === b[k][1]);
const byKey = (a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1]);

/** Actors in this process: the npm package's Node build. */
export function localActors() {
  const a = makeActors(W);
  return {
    ...a,
    publishBackground: (...args) => {
      a.publish(...args);
    },
  };
}

class World {
  relay;
  storePath;
  limits = [];
  trees = new Map(); // name → key string
  identities = new Map(); // name → secret string
  proxies = new Map();
  nextIndex = new Map();
  /** The client side: `localActors()` or actors in a browser page (same methods, async). */
  actors;
  /** Polling interval of waits (a snapshot from a page costs a round trip). */
  pollMs;

  constructor(actors, pollMs) {
    this.actors = actors;
    this.pollMs = pollMs;
  }

  snap() {
    return this.actors.snapshot();
  }

  async connect(s) {
    const name = s.str('client');
    const via = s.optStr('via') ?? 'direct';
    const treeName = s.optStr('tree') ?? 't';
    const capacity = s.optU64('capacity');
    const identity = s.optStr('identity');
    s.done();
    if (await this.actors.has('client', name)) throw new Error(`client ${name} exists`);
    if (!this.trees.has(treeName)) this.trees.set(treeName, W.TreeKey.generate(treeName).toKeyString());
    let id;
    if (identity !== undefined) {
      if (!this.identities.has(identity)) this.identities.set(identity, W.Identity.generate().toSecretString());
      id = this.identities.get(identity);
    } else id = W.Identity.generate().toSecretString();
    let url;
    if (via === 'direct') url = this.relay.url;
    else if (via === 'proxy') {
      const p = await startFaultProxy(this.relay.port);
      this.proxies.set(name, p);
      url = p.url;
    } else throw new Error(`via "${via}" is not direct or proxy`);
    await this.actors.connect(name, url, { keys: this.trees.get(treeName), identity: id, capacity });
  }

  async subscribe(s) {
    const clientName = s.str('client');
    const name = s.str('sub');
    const filter = s.str('filter');
    const opts = { qos: qos(s.optU64('qos')) };
    const replay = s.opt('replay');
    if (replay !== undefined) {
      const ks = Object.keys(replay ?? {});
      if (ks.length !== 1 || !['fromSeq', 'sinceMs', 'last'].includes(ks[0]))
        throw new Error('"replay" has exactly one of fromSeq, sinceMs, last');
      opts.replay = replay;
    }
    const durable = s.optStr('durable');
    if (durable !== undefined) opts.durable = durable;
    const capacity = s.optU64('capacity');
    if (capacity !== undefined) opts.capacity = capacity;
    const reading = s.optBool('reading') ?? true;
    s.done();
    if (await this.actors.has('sub', name)) throw new Error(`subscription ${name} exists`);
    if (!(await this.actors.has('client', clientName))) throw new Error(`no client ${clientName}`);
    await this.actors.subscribe(clientName, name, filter, opts, reading);
  }

  async publish(s) {
    const name = s.str('client');
    const topic = s.str('topic');
    const count = s.optU64('count') ?? 1;
    const q = qos(s.optU64('qos'));
    const size = s.optU64('size') ?? 8;
    const window = Math.max(1, s.optU64('window') ?? 1);
    const background = s.optBool('background') ?? false;
    s.done();
    if (!(await this.actors.has('client', name))) throw new Error(`no client ${name}`);
    const first = this.nextIndex.get(topic) ?? 0;
    this.nextIndex.set(topic, first + count);
    const args = [name, topic, first, count, q, size, window];
    if (background) await this.actors.publishBackground(...args);
    else await this.actors.publish(...args);
  }

  proxy(s) {
    const name = s.str('client');
    const action = s.str('action');
    s.done();
    const p = this.proxies.get(name);
    if (!p) throw new Error(`client ${name} is not behind a proxy`);
    switch (action) {
      case 'cut':
        return p.cut();
      case 'stall':
        return p.stall('up', true);
      case 'stall_down':
        return p.stall('down', true);
      case 'resume':
        p.stall('up', false);
        return p.stall('down', false);
      case 'duplicate':
        return p.duplicate(true);
      case 'pass':
        return p.duplicate(false);
      default:
        throw new Error(`unknown proxy action "${action}"`);
    }
  }

  async relayStep(s) {
    const action = s.str('action');
    s.done();
    const start = () => startRelay({ wsPort: this.relay.port, args: this.limits, storePath: this.storePath });
    switch (action) {
      case 'kill':
        return this.relay.stop();
      case 'start':
        this.relay = await start();
        return;
      case 'restart':
        await this.relay.stop();
        this.relay = await start();
        return;
      default:
        throw new Error(`unknown relay action "${action}"`);
    }
  }

  /** Polls `cond(snapshot)` until it holds; fails after DEADLINE_MS with `what` and `detail`. */
  async until(what, cond, detail = () => '') {
    const deadline = Date.now() + DEADLINE_MS;
    for (;;) {
      const snap = await this.snap();
      if (cond(snap)) return;
      if (Date.now() > deadline) throw new Error(`timed out after ${DEADLINE_MS} ms waiting for ${what}${detail(snap)}`);
      await new Promise((r) => setTimeout(r, this.pollMs));
    }
  }

  async wait(s) {
    const subName = s.optStr('sub');
    if (subName !== undefined) {
      const received = s.optU64('received');
      const accounted = s.optU64('accounted');
      s.done();
      if (!(await this.actors.has('sub', subName))) throw new Error(`no subscription ${subName}`);
      const sub = (snap) => snap.subs[subName];
      if (received !== undefined && accounted === undefined)
        return this.until(
          `${subName} to receive ${received}`,
          (x) => sub(x).received.length >= received,
          (x) => ` (received ${show(sub(x).received)})`,
        );
      if (accounted !== undefined && received === undefined)
        return this.until(
          `${subName} to receive or lose ${accounted}`,
          (x) => sub(x).received.length + sub(x).lost >= accounted,
          (x) => ` (received ${sub(x).received.length}, lost ${sub(x).lost})`,
        );
      throw new Error('wait on a sub needs one of received, accounted');
    }
    const name = s.str('client');
    const acked = s.optU64('acked');
    const published = s.optBool('published');
    const duplicates = s.optU64('duplicates');
    const state = s.optStr('state');
    s.done();
    if (!(await this.actors.has('client', name))) throw new Error(`no client ${name}`);
    const a = (snap) => snap.clients[name];
    const given = [acked, published, duplicates, state].filter((x) => x !== undefined).length;
    if (given !== 1) throw new Error('wait on a client needs one of acked, published, duplicates, state');
    if (acked !== undefined)
      return this.until(`${name} to have ${acked} publishes acknowledged`, (x) => a(x).acked.length >= acked);
    if (published !== undefined) {
      if (published !== true) throw new Error('"published" must be true');
      return this.until(`${name} to finish publishing`, (x) => a(x).running === 0);
    }
    if (duplicates !== undefined)
      return this.until(`${name} to count ${duplicates} duplicates`, (x) => a(x).stats.duplicates >= duplicates);
    if (!['connected', 'reconnecting', 'closed'].includes(state)) throw new Error(`unknown state "${state}"`);
    return this.until(`${name} to be ${state}`, (x) => a(x).state === state);
  }

  async expect(s) {
    const subName = s.optStr('sub');
    if (subName !== undefined) {
      const exact = s.opt('exact');
      const once = s.opt('once');
      const ordered = s.optBool('ordered');
      const includesAcked = s.optStr('includes_acked');
      const accounted = s.optU64('accounted');
      const lost = s.optU64('lost');
      const lostMin = s.optU64('lost_min');
      s.done();
      if (!(await this.actors.has('sub', subName))) throw new Error(`no subscription ${subName}`);
      // What the relay sent before now has reached the client.
      await this.actors.settle((await this.snap()).subs[subName].client, SETTLE_MS);
      const snap = await this.snap();
      const sub = snap.subs[subName];
      const got = sub.received;
      if (exact !== undefined) {
        const want = ranges(exact);
        if (!sameList(got, want)) throw new Error(`${subName} received ${show(got)} — expected exactly ${show(want)}`);
      }
      if (once !== undefined) {
        const g = [...got].sort(byKey);
        const w = ranges(once).sort(byKey);
        if (!sameList(g, w)) throw new Error(`${subName} received ${show(g)} — expected each of ${show(w)} exactly once`);
      }
      if (ordered === true) {
        const last = new Map();
        for (const [t, i] of got) {
          if (last.has(t) && last.get(t) >= i) throw new Error(`${subName} received ${t}:${i} after ${t}:${last.get(t)}`);
          last.set(t, i);
        }
      }
      if (includesAcked !== undefined) {
        const p = snap.clients[includesAcked];
        if (!p) throw new Error(`no client ${includesAcked}`);
        const have = new Set(got.map(key));
        const missing = p.acked.filter((m) => !have.has(key(m)));
        if (missing.length)
          throw new Error(`${subName} lacks ${missing.length} acknowledged publishes of ${includesAcked}: ${show(missing)}`);
      }
      if (accounted !== undefined) {
        if (new Set(got.map(key)).size !== got.length) throw new Error(`${subName} received a message twice: ${show(got)}`);
        if (got.length + sub.lost !== accounted)
          throw new Error(`${subName}: ${got.length} received + ${sub.lost} reported lost ≠ ${accounted} published`);
      }
      if (lost !== undefined && sub.lost !== lost) throw new Error(`${subName} reported ${sub.lost} lost, expected ${lost}`);
      if (lostMin !== undefined && sub.lost < lostMin)
        throw new Error(`${subName} reported ${sub.lost} lost, expected at least ${lostMin}`);
      return;
    }
    const name = s.str('client');
    const acked = s.optU64('acked');
    const failed = s.optU64('failed');
    const reconnectsMin = s.optU64('reconnects_min');
    const duplicates = s.optU64('duplicates');
    const delivered = s.optU64('delivered');
    const heldBack = s.optU64('held_back');
    s.done();
    if (!(await this.actors.has('client', name))) throw new Error(`no client ${name}`);
    // What the relay sent before now has reached the client.
    if (delivered !== undefined || heldBack !== undefined) await this.actors.settle(name, SETTLE_MS);
    // A reconnect is an event that may still be on its way (a relay restart the client has
    // not noticed yet): waited for, within the step's deadline.
    if (reconnectsMin !== undefined)
      await this.until(`${name} to reconnect ${reconnectsMin} times`, (x) => x.clients[name].stats.reconnects >= reconnectsMin);
    const a = (await this.snap()).clients[name];
    const stats = a.stats;
    if (acked !== undefined && a.acked.length !== acked)
      throw new Error(`${name} has ${a.acked.length} publishes acknowledged, expected ${acked}`);
    if (failed !== undefined && a.failed.length !== failed)
      throw new Error(`${name} has ${a.failed.length} failed publishes, expected ${failed}: ${JSON.stringify(a.failed)}`);
    if (reconnectsMin !== undefined && stats.reconnects < reconnectsMin)
      throw new Error(`${name} reconnected ${stats.reconnects} times, expected at least ${reconnectsMin}`);
    if (heldBack !== undefined && stats.heldBack !== heldBack)
      throw new Error(`${name} held back ${stats.heldBack} messages beyond a subscription's capacity, expected ${heldBack}`);
    if (delivered !== undefined && stats.delivered !== delivered)
      throw new Error(`${name} delivered ${stats.delivered} messages to its subscriptions, expected ${delivered}`);
    if (duplicates !== undefined && stats.duplicates !== duplicates)
      throw new Error(`${name} counted ${stats.duplicates} duplicates, expected ${duplicates}`);
  }

  async step(obj) {
    const s = new Step(obj);
    if (typeof obj.do !== 'string') throw new Error('a step needs "do"');
    switch (obj.do) {
      case 'connect':
        return this.connect(s);
      case 'close': {
        const c = s.str('client');
        s.done();
        if (!(await this.actors.has('client', c))) throw new Error(`no client ${c}`);
        return this.actors.close(c);
      }
      case 'flush': {
        const c = s.str('client');
        s.done();
        if (!(await this.actors.has('client', c))) throw new Error(`no client ${c}`);
        return this.actors.flush(c);
      }
      case 'subscribe':
        return this.subscribe(s);
      case 'read': {
        const name = s.str('sub');
        const on = s.optBool('on');
        if (on === undefined) throw new Error('read needs "on"');
        s.done();
        if (!(await this.actors.has('sub', name))) throw new Error(`no subscription ${name}`);
        return this.actors.read(name, on);
      }
      case 'publish':
        return this.publish(s);
      case 'proxy':
        return this.proxy(s);
      case 'relay':
        return this.relayStep(s);
      case 'wait':
        return this.wait(s);
      case 'expect':
        return this.expect(s);
      default:
        throw new Error(`unknown step "${obj.do}"`);
    }
  }
}

/**
 * Runs the scenario in `file`; throws a ScenarioError at the first failing step. The
 * clients live in this process unless `actors` (e.g. in a browser page) is given.
 */
export async function runScenario(file, { actors = localActors(), pollMs = 5 } = {}) {
  let v;
  try {
    v = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ScenarioError(-1, `${file}: ${e.message}`);
  }
  const relay = v.relay ?? {};
  const store = relay.store ?? 'memory';
  if (store !== 'memory' && store !== 'sqlite') throw new ScenarioError(-1, `store "${store}" is not memory or sqlite`);
  const w = new World(actors, pollMs);
  const dir = mkdtempSync(join(tmpdir(), 'whispeer-scenario-'));
  if (store === 'sqlite') w.storePath = join(dir, 'relay.db');
  for (const [k, val] of Object.entries(relay.limits ?? {})) w.limits.push(`--${k}`, String(val));
  if (!Array.isArray(v.steps)) throw new ScenarioError(-1, 'no "steps" array');
  try {
    w.relay = await startRelay({ args: w.limits, storePath: w.storePath });
    for (const [i, st] of v.steps.entries()) {
      try {
        if (typeof st !== 'object' || st === null || Array.isArray(st)) throw new Error('a step is an object');
        await w.step(st);
      } catch (e) {
        throw new ScenarioError(i, `step ${i} ${JSON.stringify(st)}: ${e.message}`);
      }
    }
  } finally {
    await w.actors.closeAll(5000);
    for (const p of w.proxies.values()) await p.close();
    await w.relay?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
