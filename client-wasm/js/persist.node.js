// The Node.js file store of the `persistence` option (see persist.js): an append-only log,
// written with a synchronous write before the client reports what a record covers (so it
// survives the process being killed, kill -9 included), compacted by writing the snapshot
// to a temporary file, fsync, rename. `fsync: true` also fsyncs every append (survives a
// power loss, at a cost per write).
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { WhispeerError } from './errors.js';

const open = new Set(); // files in use by a client of this process

function writeAll(fd, bytes) {
  for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at, bytes.length - at);
}

function syncDir(dir) {
  let fd;
  try {
    fd = openSync(dir, 'r');
    fsyncSync(fd);
  } catch {} // not supported everywhere (a rename is still atomic)
  finally {
    if (fd !== undefined) closeSync(fd);
  }
}

export async function openFileStore(path, fsync) {
  const full = resolve(path);
  if (open.has(full)) throw new WhispeerError('STATE', `${full} is in use by another client of this process`);
  open.add(full);
  let fd = null;
  const io = (what, f) => {
    try {
      return f();
    } catch (e) {
      throw new WhispeerError('STATE', `cannot ${what} ${full}: ${e.message}`);
    }
  };
  return {
    where: full,
    async load() {
      try {
        return readFileSync(full); // a Buffer is a Uint8Array
      } catch (e) {
        if (e.code === 'ENOENT') return undefined;
        open.delete(full);
        throw new WhispeerError('STATE', `cannot read ${full}: ${e.message}`);
      }
    },
    append(bytes) {
      io('write', () => {
        writeAll(fd, bytes);
        if (fsync) fsyncSync(fd);
      });
    },
    replace(bytes) {
      const tmp = `${full}.tmp-${process.pid}`;
      io('write', () => {
        const t = openSync(tmp, 'w', 0o600);
        try {
          writeAll(t, bytes);
          fsyncSync(t);
        } finally {
          closeSync(t);
        }
        renameSync(tmp, full);
        syncDir(dirname(full));
        if (fd !== null) closeSync(fd);
        fd = openSync(full, 'a');
      });
    },
    close() {
      open.delete(full);
      if (fd !== null) closeSync(fd);
      fd = null;
    },
  };
}
