// Where the `persistence` option keeps the client's saved state: a file in Node.js (set by
// the Node entry point, `persist.node.js`) or an IndexedDB database in browsers. The bytes
// are opaque here: the wasm `Engine` encodes, checks and replays them (client-wasm/src/
// persist.rs); a store only loads them, appends to them and replaces them (compaction).
//
// A store: `load()` → Promise<Uint8Array | undefined>; `append(bytes)` and
// `replace(bytes)` → undefined once written (file, synchronous) or a Promise (IndexedDB,
// resolved once its transaction committed); `close()`.

import { WhispeerError } from './errors.js';

let fileStore = null;

/** Used by the Node entry point to supply the file store. */
export function setFileStore(open) {
  fileStore = open;
}

const bad = (msg) => new WhispeerError('INVALID_OPTION', `persistence: ${msg}`);

/**
 * Checks the `persistence` option and returns an opener (`() => Promise<store>`), or null
 * when the option is absent.
 */
export function persistenceOption(p) {
  if (p === undefined || p === null || p === false) return null;
  if (typeof p === 'string') p = { path: p };
  if (typeof p !== 'object' || Array.isArray(p))
    throw bad(`expected a file path, { path, fsync } or { indexedDB: name }, got ${JSON.stringify(p)}`);
  const keys = Object.keys(p);
  for (const k of keys)
    if (!['path', 'fsync', 'indexedDB'].includes(k))
      throw bad(`unknown option ${JSON.stringify(k)} (known: path, fsync, indexedDB)`);
  if ((p.path === undefined) === (p.indexedDB === undefined))
    throw bad('expected exactly one of path (Node.js) and indexedDB (browsers)');
  if (p.fsync !== undefined && typeof p.fsync !== 'boolean') throw bad(`fsync: expected true or false, got ${JSON.stringify(p.fsync)}`);
  if (p.path !== undefined) {
    if (typeof p.path !== 'string' || p.path === '') throw bad(`path: expected a non-empty file path, got ${JSON.stringify(p.path)}`);
    if (!fileStore) throw bad('a file path works in Node.js only; in browsers use { indexedDB: name }');
    const { path, fsync = false } = p;
    return () => fileStore(path, fsync);
  }
  if (p.fsync !== undefined) throw bad('fsync applies to a file path only');
  if (typeof p.indexedDB !== 'string' || p.indexedDB === '')
    throw bad(`indexedDB: expected a database name, got ${JSON.stringify(p.indexedDB)}`);
  if (!globalThis.indexedDB) throw bad('indexedDB: no IndexedDB here (in Node.js use a file path)');
  const name = p.indexedDB;
  return () => openIndexedDB(name);
}

const STORE = 'log';
const open = new Set(); // databases in use by a client of this page

const state = (msg) => new WhispeerError('STATE', msg);

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error('transaction aborted'));
  });
}

/**
 * Takes the Web Lock `whispeer:<name>` if no one holds it, and holds it until the returned
 * function is called (the store's `close`); a lock is also released when its page or worker
 * goes away. Throws STATE when another client holds it. Returns a no-op where Web Locks
 * are missing (old browsers, insecure contexts): only the per-page guard applies there.
 *
 * Why: IndexedDB is shared by every tab and worker of an origin, while the `open` set
 * guards one page only. Two clients on one database would both load the same state, both
 * re-send its kept publishes, and each compaction (`replace`: clear, then add) would wipe
 * the records the other appended — its kept QoS ≥ 1 publishes and dedup entries (review
 * session 27, F9).
 */
async function lockDatabase(name) {
  const locks = globalThis.navigator?.locks;
  if (typeof locks?.request !== 'function') return () => {};
  let release;
  const held = new Promise((r) => (release = r));
  let got;
  try {
    got = await new Promise((resolve, reject) => {
      locks
        .request(`whispeer:${name}`, { ifAvailable: true }, (lock) => {
          resolve(lock !== null);
          return lock === null ? undefined : held; // kept until `release()`
        })
        .catch(reject);
    });
  } catch (e) {
    throw state(`cannot lock IndexedDB database ${JSON.stringify(name)}: ${e?.message ?? e}`);
  }
  if (!got)
    throw state(
      `IndexedDB database ${JSON.stringify(name)} is in use by another client (another tab, window or worker of this site)`,
    );
  return () => release();
}

/**
 * The error for a database of a later version than this release opens (`VersionError`):
 * with our one object store, a newer release's (not upgraded, not written: opened at its
 * own version only to read its version and stores); else someone else's.
 */
async function versionError(name) {
  let db;
  try {
    db = await request(indexedDB.open(name));
  } catch (e) {
    return state(`cannot open IndexedDB database ${JSON.stringify(name)}: ${e?.message ?? e}`);
  }
  const { version } = db;
  const ours = db.objectStoreNames.length === 1 && db.objectStoreNames.contains(STORE);
  db.close();
  if (!ours) return state(`IndexedDB database ${JSON.stringify(name)} is not a whispeer client state (other object stores)`);
  return state(
    `IndexedDB database ${JSON.stringify(name)}: client state written by a newer release of whispeer ` +
      `(format version ${version}, this release reads up to ${DB_VERSION}); not modified`,
  );
}

const DB_VERSION = 1;

/** The IndexedDB store: one object store `log` of byte chunks, in key order. */
async function openIndexedDB(name) {
  if (open.has(name)) throw state(`IndexedDB database ${JSON.stringify(name)} is in use by another client of this page`);
  open.add(name); // taken now: a second connect of this page waits for nothing
  let unlock;
  try {
    unlock = await lockDatabase(name);
  } catch (e) {
    open.delete(name);
    throw e;
  }
  const fail = (e) => {
    open.delete(name);
    unlock();
    return e;
  };
  let db;
  try {
    const r = indexedDB.open(name, DB_VERSION);
    r.onupgradeneeded = () => {
      if (r.result.objectStoreNames.length === 0) r.result.createObjectStore(STORE, { autoIncrement: true });
    };
    db = await request(r);
  } catch (e) {
    if (e?.name === 'VersionError') throw fail(await versionError(name));
    throw fail(state(`cannot open IndexedDB database ${JSON.stringify(name)}: ${e?.message ?? e}`));
  }
  if (db.objectStoreNames.length !== 1 || !db.objectStoreNames.contains(STORE)) {
    db.close();
    throw fail(state(`IndexedDB database ${JSON.stringify(name)} is not a whispeer client state (other object stores)`));
  }
  const write = (fn) => {
    const tx = db.transaction(STORE, 'readwrite', { durability: 'strict' });
    fn(tx.objectStore(STORE));
    return done(tx);
  };
  return {
    where: `IndexedDB database ${JSON.stringify(name)}`,
    async load() {
      const tx = db.transaction(STORE, 'readonly');
      const chunks = await request(tx.objectStore(STORE).getAll());
      let n = 0;
      for (const c of chunks) {
        if (!(c instanceof Uint8Array)) throw state(`IndexedDB database ${JSON.stringify(name)} is not a whispeer client state (a value is not bytes)`);
        n += c.length;
      }
      if (n === 0) return undefined;
      const out = new Uint8Array(n);
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.length;
      }
      return out;
    },
    append(bytes) {
      return write((s) => s.add(bytes));
    },
    replace(bytes) {
      return write((s) => {
        s.clear();
        s.add(bytes);
      });
    },
    close() {
      open.delete(name);
      db.close();
      unlock();
    },
  };
}
