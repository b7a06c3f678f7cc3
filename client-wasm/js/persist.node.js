// The Node.js file store of the `persistence` option (see persist.js): an append-only log,
// written with a synchronous write before the client reports what a record covers (so it
// survives the process being killed, kill -9 included), compacted by writing the snapshot
// to a temporary file, fsync, rename. `fsync: true` also fsyncs every append (survives a
// power loss, at a cost per write).
//
// The directory may be writable by others (a path under a shared /tmp): the temporary file
// gets a random name and is created exclusively (O_CREAT | O_EXCL, mode 0600), so a file
// or symlink planted at a name we would use is never opened, written through or renamed
// into place, and the state file always ends up a fresh 0600 file of ours; the append
// descriptor does not follow a symlink put at the state path (O_NOFOLLOW where the
// platform has it). Nothing is removed that this process did not create. (Review session
// 27, F3: before, `${path}.tmp-${pid}` was opened with 'w', which followed a planted
// symlink and truncated its target, or kept a planted file's owner and mode.)
import { closeSync, constants, fstatSync, fsyncSync, openSync, readFileSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { dirname, resolve } from 'node:path';
import { WhispeerError } from './errors.js';

// O_NOFOLLOW is missing on Windows (undefined there): plain append, as before.
const APPEND = constants.O_NOFOLLOW === undefined ? 'a' : constants.O_WRONLY | constants.O_APPEND | constants.O_NOFOLLOW;
// Loading: no symlink followed, and no blocking open (a FIFO planted at the path blocked the
// whole event loop until a writer came; a symlink to /dev/zero was read until memory ran out).
const LOAD = constants.O_NOFOLLOW === undefined ? 'r' : constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

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
      let rfd;
      try {
        rfd = openSync(full, LOAD);
        if (!fstatSync(rfd).isFile()) throw new Error('not a regular file');
        return readFileSync(rfd); // a Buffer is a Uint8Array
      } catch (e) {
        if (e.code === 'ENOENT') return undefined;
        open.delete(full);
        const why = e.code === 'ELOOP' ? 'a symbolic link (not followed)' : e.message;
        throw new WhispeerError('STATE', `cannot read ${full}: ${why}`);
      } finally {
        if (rfd !== undefined) closeSync(rfd);
      }
    },
    append(bytes) {
      io('write', () => {
        writeAll(fd, bytes);
        if (fsync) fsyncSync(fd);
      });
    },
    replace(bytes) {
      io('write', () => {
        const tmp = `${full}.tmp-${randomBytes(12).toString('hex')}`;
        const t = openSync(tmp, 'wx', 0o600); // EEXIST for anything already there, symlinks included
        let moved = false;
        try {
          try {
            writeAll(t, bytes);
            fsyncSync(t);
          } finally {
            closeSync(t);
          }
          renameSync(tmp, full); // replaces a symlink at `full` itself, never its target
          moved = true;
        } finally {
          if (!moved) {
            try {
              unlinkSync(tmp); // ours: created above
            } catch {}
          }
        }
        syncDir(dirname(full));
        if (fd !== null) closeSync(fd);
        fd = null;
        fd = openSync(full, APPEND);
      });
    },
    close() {
      open.delete(full);
      if (fd !== null) closeSync(fd);
      fd = null;
    },
  };
}
