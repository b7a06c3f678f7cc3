//! Client persistence: what must survive a client restart for at-least-once and
//! exactly-once to hold end to end.
//!
//! `Persistence::sqlite(path)` in the builder keeps, in one SQLite file (WAL):
//! - the **outbox**: every QoS ≥ 1 publish (the sealed `Pub` frame, publish id included)
//!   until the relay's `PubAck`; a restarted client re-sends them first, with the same
//!   publish ids, so the relay's dedup window recognises exactly-once re-sends;
//! - the **dedup window** of the receiver checks (PROTOCOL §4.11): every `(tree, sender,
//!   msg_id)` delivered to any subscription, until it expires by time (the client's replay
//!   horizon), so a message replayed or redelivered after a restart is not delivered again;
//! - the **retained high-water mark** of each topic (keyed by `BLAKE3(tree id ‖ topic)`),
//!   so a retained value can never be rolled back across a restart;
//! - the **pinned admin** of every tree the keyring has seen (`Keyring::export_pins`, one
//!   row, table `pins`), imported on start before anything else, so after a restart an epoch
//!   certificate signed by anyone but the pinned admin is refused;
//! - **when each epoch was superseded** (`Keyring::superseded_epochs`, table `superseded`,
//!   one row per tree and epoch), restored on start before the grants' grace is judged, so
//!   a restart does not restart the previous epoch's grace.
//!
//! Whatever of it cannot be loaded at start fails the connect ([`PersistError::Unreadable`]
//! when the file is damaged, [`PersistError::Unavailable`] when it could not be read just
//! now): the client never starts with an empty dedup window (replays) or outbox (lost
//! publishes) in place of one it could not read. The writes a start only tidies with are
//! best-effort (logged): a file that cannot be written still loads.
//!
//! Durable *positions* live on the relay (the durable floor, persisted there); the client
//! resumes them by name. Only ciphertext frames, ids and hashes are written, never
//! plaintext or topic names.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::{params, Connection};
use whispeer_protocol::TreeId;

use crate::core::receive::{Change, Guard};

use crate::options::Engine;
use crate::ClientBuilder;

/// `application_id` of a whispeer client state file ("wspc").
const APPLICATION_ID: i64 = 0x7773_7063;
const SCHEMA_VERSION: i64 = 2;

/// Tables added in schema version 2 (created on a version-1 file too).
const V2_TABLES: &str = "CREATE TABLE IF NOT EXISTS seen (tree BLOB NOT NULL, sender BLOB NOT NULL,
                             msg_id BLOB NOT NULL, expires INTEGER NOT NULL,
                             PRIMARY KEY (tree, sender, msg_id));
    CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires);
    CREATE TABLE IF NOT EXISTS retained (key BLOB PRIMARY KEY, ts INTEGER NOT NULL,
                                         msg_id BLOB NOT NULL);";

pub use crate::error::{PersistError, UnsafeFile};

/// Unix: the state file is the owner's alone, and only a file of this user is used.
///
/// It holds who messaged this client and when (sender keys, tree and message ids with their
/// expiry), durable names, the pinned admins and kept publishes (sealed frames sent under
/// this client's relay account), so in a directory others can write (a shared `/tmp`) a
/// planted symbolic link or database — pins blocking the real admin, a dedup window
/// refusing history, an outbox of frames to send — must not be used (security review:
/// it was opened with a plain `Connection::open`, 0644 under the usual umask, symlinks
/// followed, anyone's file used as is). Parity with the npm Node store
/// (`client-wasm/js/persist.node.js`: `O_NOFOLLOW`, regular-file check, 0600 writes).
///
/// - A missing file is created here, `O_CREAT | O_EXCL`, mode 0600 set explicitly (whatever
///   the umask), before SQLite opens it; SQLite gives the `-wal` and `-shm` it creates the
///   main file's mode.
/// - At the path (and at its `-wal`, `-shm`, `-journal` if present) a symbolic link, a
///   file that is not regular, another user's file or one writable by group or others is
///   refused ([`PersistError::Unsafe`]); one of ours only readable by others is made 0600,
///   with a warning. The directory part of the path is resolved (symbolic links there are
///   the user's own choice), then SQLite opens the file with `SQLITE_OPEN_NOFOLLOW`.
/// - What stays: another user who can write the directory can still race a `-wal` in
///   between the check and SQLite creating it; keep the state in a directory of your own
///   (a broker creates its directory 0700).
#[cfg(unix)]
pub(crate) mod guard {
    use std::fs::{File, OpenOptions, Permissions};
    use std::io;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use super::UnsafeFile;

    /// Why a path was not handed to SQLite.
    #[derive(Debug)]
    pub(crate) enum Refused {
        Unsafe(PathBuf, UnsafeFile),
        Io(PathBuf, io::Error),
    }

    impl From<Refused> for super::PersistError {
        fn from(r: Refused) -> Self {
            match r {
                Refused::Unsafe(path, reason) => super::PersistError::Unsafe { path, reason },
                Refused::Io(path, source) => super::PersistError::Io { path, source },
            }
        }
    }

    /// The files SQLite may keep beside a database.
    const BESIDE: [&str; 3] = ["-wal", "-shm", "-journal"];

    /// Checks (or creates, 0600) the database at `path` and what SQLite keeps beside it;
    /// returns the path SQLite is to open (directory resolved, last component as given).
    pub(crate) fn prepare(path: &Path) -> Result<PathBuf, Refused> {
        let full = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::canonicalize(dir)
                    .map_err(|e| Refused::Io(dir.to_owned(), e))?
                    .join(name)
            }
            _ => path.to_owned(),
        };
        let unsafe_ = |reason| Refused::Unsafe(path.to_owned(), reason);
        match std::fs::symlink_metadata(&full) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create(&full) {
                Ok(()) => {}
                // Created by someone else in between: checked as any existing file.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    check(&full, path)?;
                }
                Err(e) => return Err(Refused::Io(path.to_owned(), e)),
            },
            Err(e) => return Err(Refused::Io(path.to_owned(), e)),
            Ok(m) if m.file_type().is_symlink() => return Err(unsafe_(UnsafeFile::Symlink)),
            Ok(_) => check(&full, path)?,
        }
        for suffix in BESIDE {
            let mut side = full.clone().into_os_string();
            side.push(suffix);
            let mut shown = path.as_os_str().to_owned();
            shown.push(suffix);
            match std::fs::symlink_metadata(&side) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Refused::Io(shown.into(), e)),
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Refused::Unsafe(shown.into(), UnsafeFile::Symlink))
                }
                Ok(_) => {
                    #[cfg(test)]
                    hook::between_lstat_and_open(Path::new(&side));
                    match check(Path::new(&side), Path::new(&shown)) {
                        // Gone since the lstat: another connection to the file (a process
                        // of ours shutting down, another writer of a local history) closed
                        // the last one, and SQLite checkpointed the log and removed it and
                        // the index. Absent, as if the lstat had not found it (it was a
                        // spurious "No such file" refusing the start).
                        Err(Refused::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => {}
                        r => r?,
                    }
                }
            }
        }
        Ok(full)
    }

    /// A new file of ours, 0600 whatever the umask (`O_EXCL`: nothing already there, a
    /// symbolic link included, is opened).
    fn create(full: &Path) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(full)?;
        f.set_permissions(Permissions::from_mode(0o600))?;
        // On a filesystem that keeps no modes the fchmod is silently ignored: said now (the
        // next start sees it again, through a probe, when the file looks unsafe).
        let m = f.metadata()?;
        let k = Kept::shown(m.mode(), m.uid(), rustix::process::geteuid().as_raw());
        if let Some(dir) = full.parent() {
            warn_unkept(dir, k);
        }
        Ok(())
    }

    /// What the filesystem of a directory keeps of the permissions files are given.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Kept {
        /// chmod sticks: a mode shown is one given (so a group/other-writable one is real).
        pub(crate) modes: bool,
        /// A file we create is shown as ours (so another owner shown is real).
        pub(crate) owners: bool,
    }

    impl Kept {
        /// A filesystem with Unix permissions (also what is assumed when it cannot be
        /// probed: the checks stay).
        pub(crate) const ALL: Kept = Kept {
            modes: true,
            owners: true,
        };

        /// What a file we have just created and `fchmod`ed 0600 shows (`mode` and `owner`
        /// from its `fstat`, `uid` the effective uid): modes are kept if it is 0600, owners
        /// if it is ours. A filesystem without Unix modes (vfat/exFAT, WSL's drvfs, SMB,
        /// some FUSE) shows every file with the mount's mode (0777, 0755…) and owner.
        pub(crate) fn shown(mode: u32, owner: u32, uid: u32) -> Kept {
            Kept {
                modes: mode & 0o777 == 0o600,
                owners: owner == uid,
            }
        }

        /// The verdict on an existing regular file showing `mode` and `owner`: another
        /// user's (where owners are kept) or one writable by group or others (where modes
        /// are kept) is refused.
        pub(crate) fn check(self, mode: u32, owner: u32, uid: u32) -> Result<(), UnsafeFile> {
            if self.owners && owner != uid {
                return Err(UnsafeFile::OtherOwner { owner, uid });
            }
            let mode = mode & 0o7777;
            if self.modes && mode & 0o022 != 0 {
                return Err(UnsafeFile::WritableByOthers { mode });
            }
            Ok(())
        }
    }

    /// Probes the filesystem of `dir`: a new file created there (`O_EXCL`, no link
    /// followed, 0600), `fchmod` 0600, `fstat`, removed. [`Kept::ALL`] if no file can be
    /// made there (the checks stay). On a filesystem with Unix permissions the probe always
    /// shows them kept — no one else can change a mode or an owner on a file we just made
    /// and hold open — so a file really writable by others there is still refused.
    pub(crate) fn kept_in(dir: &Path) -> Kept {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        for _ in 0..8 {
            let probe = dir.join(format!(
                ".whispeer-permission-probe-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let f = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&probe)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(_) => return Kept::ALL,
            };
            let chmod = f.set_permissions(Permissions::from_mode(0o600));
            let shown = f.metadata();
            drop(f);
            let _ = std::fs::remove_file(&probe);
            let uid = rustix::process::geteuid().as_raw();
            return match (chmod, shown) {
                (Ok(()), Ok(m)) => Kept::shown(m.mode(), m.uid(), uid),
                // vfat without `quiet` refuses a chmod it cannot keep.
                (Err(e), Ok(m))
                    if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) =>
                {
                    Kept {
                        modes: false,
                        owners: m.uid() == uid,
                    }
                }
                _ => Kept::ALL,
            };
        }
        Kept::ALL
    }

    /// Whether `dir` is one not warned about yet (once per directory and process).
    pub(crate) fn first_warning(dir: &Path) -> bool {
        static WARNED: std::sync::Mutex<Option<std::collections::HashSet<PathBuf>>> =
            std::sync::Mutex::new(None);
        WARNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Default::default)
            .insert(dir.to_owned())
    }

    /// Says once per directory that its filesystem keeps no modes or owners, so they are
    /// not checked there (nor can they protect the files).
    pub(crate) fn warn_unkept(dir: &Path, kept: Kept) {
        if kept == Kept::ALL || !first_warning(dir) {
            return;
        }
        let what = match (kept.modes, kept.owners) {
            (false, false) => "no file modes nor owners",
            (false, true) => "no file modes",
            _ => "no file owners",
        };
        tracing::warn!(
            directory = %dir.display(),
            "the filesystem of this directory keeps {what} (vfat/exFAT, WSL drvfs, SMB or a \
             FUSE filesystem?): files there are not checked for them and cannot be made \
             owner-only — keep whispeer's files on a filesystem with Unix permissions if \
             other users can reach this one (symbolic links are still refused)"
        );
    }

    /// An existing file: regular, ours, writable by us alone; readable by others → 0600.
    fn check(full: &Path, shown: &Path) -> Result<(), Refused> {
        open_checked(
            full,
            shown,
            Some("it holds who messaged this client and when"),
        )
        .map(drop)
    }

    /// An existing file, opened for reading without following a symbolic link (refused
    /// as [`UnsafeFile::Symlink`]): regular, ours, writable by us alone. With `private`
    /// (what it holds, for the warning) one only readable by others is made 0600, with a
    /// warning. A missing file is `Refused::Io` of kind `NotFound`.
    pub(crate) fn open_checked(
        full: &Path,
        shown: &Path,
        private: Option<&str>,
    ) -> Result<File, Refused> {
        let unsafe_ = |reason| Refused::Unsafe(shown.to_owned(), reason);
        // No symbolic link followed (one swapped in since the lstat), no blocking on a FIFO.
        let f: File = OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(full)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    unsafe_(UnsafeFile::Symlink)
                } else {
                    Refused::Io(shown.to_owned(), e)
                }
            })?;
        let m = f.metadata().map_err(|e| Refused::Io(shown.to_owned(), e))?;
        let t = m.file_type();
        if !t.is_file() {
            let kind = if t.is_dir() {
                "directory"
            } else if t.is_fifo() {
                "FIFO"
            } else if t.is_socket() {
                "socket"
            } else if t.is_block_device() {
                "block device"
            } else if t.is_char_device() {
                "character device"
            } else {
                "special file"
            };
            return Err(unsafe_(UnsafeFile::NotRegular { kind }));
        }
        let uid = rustix::process::geteuid().as_raw();
        let mode = m.mode() & 0o7777;
        let mut kept = Kept::ALL;
        if kept.check(mode, m.uid(), uid).is_err() {
            // Before refusing: on a filesystem that keeps no modes or owners (review B2: WSL
            // /mnt/c, vfat/exFAT, SMB, some FUSE) the file we created 0600 shows 0777 or the
            // mount's owner from the second start on; what it shows says nothing there.
            if let Some(dir) = full.parent() {
                kept = kept_in(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                });
                warn_unkept(dir, kept);
            }
        }
        kept.check(mode, m.uid(), uid).map_err(unsafe_)?;
        if let (Some(holds), true) = (private, kept.modes && mode & 0o044 != 0) {
            tracing::warn!(
                file = %shown.display(),
                mode = format_args!("{mode:03o}"),
                "file readable by others ({holds}), made owner-only (0600)"
            );
            f.set_permissions(Permissions::from_mode(mode & 0o700))
                .map_err(|e| Refused::Io(shown.to_owned(), e))?;
        }
        Ok(f)
    }

    /// Test hooks: something done at a point of the check another process could act at.
    #[cfg(test)]
    pub(crate) mod hook {
        use std::cell::RefCell;
        use std::path::Path;

        type Hook = Box<dyn FnMut(&Path)>;

        thread_local! {
            static BETWEEN: RefCell<Option<Hook>> = const { RefCell::new(None) };
        }

        /// Runs `f` (on this thread) with a path beside the database once it was found by
        /// `lstat` and before it is opened.
        pub(crate) fn set_between_lstat_and_open(f: impl FnMut(&Path) + 'static) {
            BETWEEN.with(|b| *b.borrow_mut() = Some(Box::new(f)));
        }

        pub(super) fn between_lstat_and_open(side: &Path) {
            BETWEEN.with(|b| {
                if let Some(f) = b.borrow_mut().as_mut() {
                    f(side)
                }
            });
        }

        /// A filesystem without Unix permissions mounted for a test: an exFAT image on a
        /// loop device through FUSE (`mkfs.exfat`, `mount.exfat-fuse`; vfat is not in this
        /// kernel). Every file shows 0777 and root's, whatever it was given. `None` (said
        /// on stderr) where it cannot be made: not root, the tools missing (Debian:
        /// `exfatprogs`, `exfat-fuse`), no loop device or FUSE.
        pub(crate) struct ModelessMount {
            pub(crate) path: std::path::PathBuf,
            device: String,
            _dir: tempfile::TempDir,
        }

        impl ModelessMount {
            pub(crate) fn new() -> Option<ModelessMount> {
                use std::process::Command;
                let skip = |why: &str| {
                    eprintln!("no filesystem without modes mounted ({why}): part skipped");
                    None
                };
                if !rustix::process::geteuid().is_root() {
                    return skip("not root");
                }
                let dir = tempfile::tempdir().ok()?;
                let image = dir.path().join("exfat.img");
                std::fs::File::create(&image).ok()?.set_len(16 << 20).ok()?;
                let run = |cmd: &mut Command| {
                    cmd.output()
                        .ok()
                        .filter(|o| o.status.success())
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                };
                if run(Command::new("mkfs.exfat").arg(&image)).is_none() {
                    return skip("mkfs.exfat");
                }
                let Some(device) = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))
                else {
                    return skip("losetup");
                };
                let path = dir.path().join("mnt");
                std::fs::create_dir(&path).ok()?;
                let m = ModelessMount {
                    path,
                    device,
                    _dir: dir,
                };
                if run(Command::new("mount.exfat-fuse").arg(&m.device).arg(&m.path)).is_none() {
                    // Dropped: the loop device detached (the umount fails, nothing mounted).
                    return skip("mount.exfat-fuse");
                }
                Some(m)
            }
        }

        impl Drop for ModelessMount {
            fn drop(&mut self) {
                use std::process::Command;
                let _ = Command::new("umount").arg(&self.path).output();
                let _ = Command::new("losetup").args(["-d", &self.device]).output();
            }
        }
    }
}

/// Where a client keeps its outbox and dedup window; give it to the builder with `.with(...)`.
#[derive(Debug, Clone)]
pub struct Persistence {
    pub(crate) path: PathBuf,
}

impl Persistence {
    /// A SQLite file (created if missing). On Unix it is created 0600, and a symbolic link,
    /// a file that is not regular, another user's or one writable by others at the path is
    /// refused ([`PersistError::Unsafe`]); one readable by others is made 0600.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Persistence { path: path.into() }
    }
}

impl Engine for Persistence {
    fn apply(self, b: &mut ClientBuilder) {
        b.state_file = Some(self.path);
    }
    /// On a broker the path is a directory: the relay's history, the embedded client's
    /// state and the broker's key file, side by side.
    fn apply_broker(self, b: &mut crate::options::BrokerSetup) {
        b.store_dir = Some(self.path);
    }
}

/// Rows of a table with a value of the wrong type or size (SQLite stores whatever it is
/// given): skipped by the reads at start, and dropped when the file can be written
/// (`Store::drop_malformed`).
const OUTBOX_BAD: &str = "typeof(pid) != 'blob' OR length(pid) != 16 OR typeof(ord) != 'integer' \
                          OR typeof(frame) != 'blob'";
const SEEN_BAD: &str = "typeof(tree) != 'blob' OR length(tree) != 16 OR typeof(sender) != 'blob' \
                        OR length(sender) != 32 OR typeof(msg_id) != 'blob' \
                        OR length(msg_id) != 16 OR typeof(expires) != 'integer'";
const RETAINED_BAD: &str = "typeof(key) != 'blob' OR length(key) != 32 OR typeof(ts) != 'integer' \
                            OR typeof(msg_id) != 'blob' OR length(msg_id) != 16";
const WINDOW_BAD: &str = "typeof(forgot_upto) != 'integer'";
const SUPERSEDED_BAD: &str = "typeof(tree) != 'blob' OR length(tree) != 16 \
                              OR typeof(epoch) != 'integer' OR typeof(at) != 'integer'";

/// The open state file (used by the connection task only).
#[derive(Debug)]
pub(crate) struct Store {
    db: Connection,
    path: PathBuf,
    /// Dedup entries written since expired ones were last deleted.
    since_prune: std::cell::Cell<u64>,
    /// Rows of `seen` at most (counted at open, then every insert counted as a new row):
    /// when it passes the window's capacity by an eighth, the oldest rows are trimmed.
    seen_rows: std::cell::Cell<u64>,
    /// What a failed write left unsaved, written with the next one (see [`Pending`]).
    pending: std::cell::RefCell<Pending>,
    /// After a failed write, no write is tried before then (the driver's timer retries):
    /// a file another writer holds makes each try wait the 5 s busy timeout, and the
    /// connection task must not wait that at every turn.
    retry_at: std::cell::Cell<Option<std::time::Instant>>,
    /// The wait after the next failure (doubling from [`RETRY_FIRST`] to [`RETRY_MAX`]).
    retry_wait: std::cell::Cell<std::time::Duration>,
    /// Writes that failed so far (`ClientStats::state_write_failures`).
    failures: std::cell::Cell<u64>,
}

/// First wait before a failed write is tried again.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between tries of a failed write.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// Publish ids whose saved row could not be deleted, kept to retry at most (beyond, the
/// oldest are left in the file: a restart re-sends them under the same publish id, which
/// the relay's dedup window answers without a second delivery).
const MAX_PENDING_CLEARED: usize = 65_536;

/// Changes of what durables are owed kept to retry at most (one or two per message another
/// subscription takes while a durable holds it: rare); beyond, the table is rewritten from
/// what the core holds.
const MAX_PENDING_OWED: usize = 1 << 18;

/// What failed writes left unsaved (review: a failed write — a full disk, another writer
/// holding the lock past the busy timeout — dropped its whole batch, so messages taken and
/// acknowledged meanwhile were delivered again after a restart, and a failed `keep` lost a
/// QoS ≥ 1 publish from the saved outbox). Kept in memory, merged with later changes and
/// written with the next write, bounded:
/// - dedup entries by key (latest expiry), at most the window's capacity: beyond it, those
///   expiring first are left out and `forgot_upto` raised to cover them, as the window
///   forgets for room (a restored window refuses what they covered);
/// - retained marks by key (latest): past the window's capacity, the table is rewritten
///   from the receiver's snapshot at the next write instead (`repair`, as the npm client
///   rewrites its whole state); what durables are owed, in order, up to
///   [`MAX_PENDING_OWED`] (then rewritten from the core's);
/// - kept publishes by publish id (the engine's outbox bounds them), deletions of
///   acknowledged ones up to [`MAX_PENDING_CLEARED`].
#[derive(Debug, Default)]
struct Pending {
    seen: std::collections::HashMap<crate::core::receive::DedupKey, u64>,
    forgot_upto: u64,
    retained: std::collections::HashMap<crate::core::receive::RetainedKey, (u64, [u8; 16])>,
    owed: Vec<Change>,
    /// The retained marks are rewritten from the receiver's snapshot at the next write.
    repair: bool,
    /// The owed messages are rewritten from the core's at the next write (past
    /// [`MAX_PENDING_OWED`] changes: rows past the 65,536 the core holds are then lost).
    repair_owed: bool,
    kept: std::collections::BTreeMap<[u8; 16], (u64, Vec<u8>)>,
    cleared: std::collections::BTreeSet<[u8; 16]>,
}

impl Pending {
    /// Receiver state (what acks wait for) not yet saved.
    fn receiver(&self) -> bool {
        !self.seen.is_empty()
            || self.forgot_upto > 0
            || !self.retained.is_empty()
            || !self.owed.is_empty()
            || self.repair
            || self.repair_owed
    }

    fn any(&self) -> bool {
        self.receiver() || !self.kept.is_empty() || !self.cleared.is_empty()
    }

    /// Merges `changes` (newer than what is held), bounded as said on [`Pending`].
    fn add(&mut self, changes: Vec<Change>, now_ms: u64, max_seen: usize) {
        for c in changes {
            match c {
                Change::Seen { key, expires_ms } => {
                    let e = self.seen.entry(key).or_insert(0);
                    *e = (*e).max(expires_ms);
                }
                Change::Retained { key, ts_ms, msg_id } => {
                    if !self.repair {
                        self.retained.insert(key, (ts_ms, msg_id));
                    }
                }
                c => {
                    if !self.repair_owed {
                        self.owed.push(c);
                    }
                }
            }
        }
        // What expired needs no row.
        self.seen.retain(|_, e| *e > now_ms);
        if self.seen.len() > max_seen {
            let mut exp: Vec<u64> = self.seen.values().copied().collect();
            let (_, cut, _) = exp.select_nth_unstable(self.seen.len() - max_seen - 1);
            let cut = *cut;
            self.seen.retain(|_, e| *e > cut);
            self.forgot_upto = self.forgot_upto.max(cut);
        }
        if self.retained.len() > max_seen.max(1024) {
            self.retained.clear();
            self.repair = true;
        }
        if self.owed.len() > MAX_PENDING_OWED {
            self.owed.clear();
            self.repair_owed = true;
        }
    }
}

/// What a repairing write rewrites the retained marks and owed messages from: the
/// receiver's snapshot (`Guard::snapshot`) and the core's owed messages.
pub(crate) struct Repair {
    pub(crate) retained: Vec<(crate::core::receive::RetainedKey, u64, [u8; 16])>,
    pub(crate) forgot_upto: u64,
    pub(crate) owed: Vec<(String, crate::core::receive::Digest)>,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Store, PersistError> {
        let err = |source| PersistError::Sqlite {
            path: path.to_owned(),
            source,
        };
        // Unix: created 0600 here if missing; a symbolic link, a file not regular, another
        // user's or one writable by others is refused (see [`guard`]). SQLite then opens
        // it without following a symbolic link and without URI names (the path is a path).
        #[cfg(unix)]
        let (file, nofollow) = (
            guard::prepare(path)?,
            rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
        );
        #[cfg(not(unix))]
        let (file, nofollow) = (path.to_owned(), rusqlite::OpenFlags::empty());
        // A symbolic link put at the path since the check.
        let symlink = |e: rusqlite::Error| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CANTOPEN_SYMLINK =>
            {
                PersistError::Unsafe {
                    path: path.to_owned(),
                    reason: UnsafeFile::Symlink,
                }
            }
            e => err(e),
        };
        // A file written by a newer release is recognised through a read-only connection
        // first: a read-write one, even refusing it, checkpoints a write-ahead log the newer
        // release left into the file as it closes (and deletes the log).
        if file.exists() {
            if let Ok(ro) = Connection::open_with_flags(
                &file,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | nofollow,
            ) {
                let ids = ro.query_row(
                    "SELECT application_id, user_version FROM pragma_application_id, pragma_user_version",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                );
                if let Ok((APPLICATION_ID, version)) = ids {
                    if version > SCHEMA_VERSION {
                        return Err(PersistError::Newer {
                            path: path.to_owned(),
                            version,
                            supported: SCHEMA_VERSION,
                        });
                    }
                }
            }
        }
        #[cfg(unix)]
        let db = Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                | nofollow,
        )
        .map_err(symlink)?;
        #[cfg(not(unix))]
        let db = Connection::open(&file).map_err(symlink)?;
        let app: i64 = db
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(err)?;
        let version: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let tables: i64 = db
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(err)?;
        let foreign = |reason: String| PersistError::Foreign {
            path: path.to_owned(),
            reason,
        };
        // Written by a newer release: refused before anything is written, whatever it
        // holds (even no table yet: a creation of its own cut short is not ours to redo).
        // Before, it was called "not a whispeer client state file".
        if app == APPLICATION_ID && version > SCHEMA_VERSION {
            return Err(PersistError::Newer {
                path: path.to_owned(),
                version,
                supported: SCHEMA_VERSION,
            });
        }
        // A new file — or one whose creation a crash cut short before this was one
        // transaction (its application id set, no table yet): created in one transaction,
        // so a kill or a full disk midway leaves a file the next start creates again, not
        // one refused at every start.
        if (app == 0 || app == APPLICATION_ID) && tables == 0 {
            db.execute_batch(&format!(
                "PRAGMA journal_mode = WAL;
                 BEGIN IMMEDIATE;
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};
                 CREATE TABLE outbox (pid BLOB PRIMARY KEY, ord INTEGER NOT NULL, frame BLOB NOT NULL);
                 CREATE TABLE dedup (name TEXT NOT NULL, key BLOB NOT NULL, ord INTEGER NOT NULL,
                                     PRIMARY KEY (name, key));
                 CREATE INDEX dedup_ord ON dedup (name, ord);
                 {V2_TABLES}
                 COMMIT;"
            ))
            .map_err(err)?;
        } else if app == APPLICATION_ID && version == 1 {
            db.execute_batch(&format!(
                "BEGIN; {V2_TABLES} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(err)?;
        } else if app != APPLICATION_ID {
            return Err(foreign(format!("application_id is {app:#x}")));
        } else if version != SCHEMA_VERSION {
            return Err(foreign(format!(
                "schema version {version}, expected {SCHEMA_VERSION}"
            )));
        }
        // `pins` came after schema 2 was released, `superseded` later: created in any
        // schema-2 file that lacks them (older clients ignore the tables; one that ignores
        // `superseded` restarts the previous epoch's grace at its start, as it did).
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS pins (id INTEGER PRIMARY KEY CHECK (id = 1),
                                              bytes BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS seen_window (id INTEGER PRIMARY KEY CHECK (id = 1),
                                                forgot_upto INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS owed (durable TEXT NOT NULL, digest BLOB NOT NULL,
                                              PRIMARY KEY (durable, digest));
             CREATE TABLE IF NOT EXISTS superseded (tree BLOB NOT NULL, epoch INTEGER NOT NULL,
                                                    at INTEGER NOT NULL,
                                                    PRIMARY KEY (tree, epoch));",
        )
        .map_err(err)?;
        let rows: i64 = db
            .query_row("SELECT count(*) FROM seen", [], |r| r.get(0))
            .map_err(err)?;
        Ok(Store {
            db,
            path: path.to_owned(),
            since_prune: std::cell::Cell::new(0),
            seen_rows: std::cell::Cell::new(rows.max(0) as u64),
            pending: Default::default(),
            retry_at: std::cell::Cell::new(None),
            retry_wait: std::cell::Cell::new(RETRY_FIRST),
            failures: std::cell::Cell::new(0),
        })
    }

    /// Deletes the rows of `table` matching `bad` (a value of the wrong type or size: SQLite
    /// stores whatever it is given, and one such row failed the whole table's read — every
    /// kept publish left unsent, or the dedup window and what durables are owed not loaded
    /// — at every start). One bad row costs only itself; each is counted in the log.
    ///
    /// Tidying only: the reads skip such rows themselves (`WHERE NOT (bad)`), so the start
    /// never depends on this write. It is tried only when there is such a row, and a
    /// failure (a read-only file, another writer holding the lock, a full disk) is logged:
    /// a later start drops them (review of e8ad48c: it failed the connect, as damage).
    fn drop_malformed(&self, table: &str, bad: &str) -> rusqlite::Result<()> {
        let any: bool = self.db.query_row(
            &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE {bad})"),
            [],
            |r| r.get(0),
        )?;
        if !any {
            return Ok(());
        }
        match self
            .db
            .execute(&format!("DELETE FROM {table} WHERE {bad}"), [])
        {
            Ok(n) => {
                tracing::warn!(file = %self.path.display(), table, rows = n, "client state: malformed rows dropped")
            }
            Err(e) => self.warn(
                &format!("dropping the malformed rows of {table} (skipped)"),
                e,
            ),
        }
        Ok(())
    }

    /// A tidying write at start (dates brought down to their bound, rows no longer owed
    /// pruned): logged if it fails, never failing the start — what was loaded is right
    /// without it, and a later start tries again.
    fn tidy(&self, what: &str, run: impl FnOnce() -> rusqlite::Result<()>) {
        if let Err(e) = run() {
            self.warn(&format!("{what} (left for a later start)"), e);
        }
    }

    /// The error for a part that cannot be loaded at start: [`PersistError::Unreadable`]
    /// (damaged: restore or move aside) only when SQLite says the file is damaged or a value
    /// in it cannot be read; [`PersistError::Unavailable`] (retry, do not move aside) when
    /// it could not be read, locked or written just now.
    fn unreadable(&self, part: &'static str) -> impl FnOnce(rusqlite::Error) -> PersistError + '_ {
        move |source| {
            use rusqlite::ErrorCode as C;
            let path = self.path.clone();
            match source.sqlite_error_code() {
                Some(
                    C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::ReadOnly
                    | C::DiskFull
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::PermissionDenied
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
                    | C::OperationInterrupted
                    | C::NoLargeFileSupport,
                ) => PersistError::Unavailable { path, part, source },
                _ => PersistError::Unreadable { path, part, source },
            }
        }
    }

    fn warn(&self, what: &str, e: rusqlite::Error) {
        tracing::error!(file = %self.path.display(), error = %e, "client state: {what} failed");
    }

    /// The unacknowledged publishes, oldest first ([`PersistError::Unreadable`] when they
    /// cannot be read: before, that was logged and the client started without them).
    pub(crate) fn outbox(&self) -> Result<Vec<([u8; 16], u64, Bytes)>, PersistError> {
        let load = || -> rusqlite::Result<Vec<([u8; 16], u64, Bytes)>> {
            self.drop_malformed("outbox", OUTBOX_BAD)?;
            let mut st = self.db.prepare(&format!(
                "SELECT pid, ord, frame FROM outbox WHERE NOT coalesce(({OUTBOX_BAD}), 1) \
                 ORDER BY ord"
            ))?;
            let rows = st.query_map([], |r| {
                let pid: Vec<u8> = r.get(0)?;
                let ord: i64 = r.get(1)?;
                let frame: Vec<u8> = r.get(2)?;
                Ok((pid, ord, frame))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (pid, ord, frame) = row?;
                if let Ok(pid) = <[u8; 16]>::try_from(pid.as_slice()) {
                    out.push((pid, ord as u64, Bytes::from(frame)));
                }
            }
            Ok(out)
        };
        load().map_err(self.unreadable("outbox"))
    }

    /// Saves a kept QoS ≥ 1 publish. If the write fails (or waits for a retry after a
    /// failure) the publish is held in memory and written with the next write
    /// ([`Pending`]); before, it was lost from the saved outbox.
    pub(crate) fn keep(&self, pid: &[u8; 16], ord: u64, frame: &[u8]) {
        let mut p = self.pending.borrow_mut();
        p.cleared.remove(pid);
        p.kept.insert(*pid, (ord, frame.to_vec()));
        drop(p);
        self.write_outbox();
    }

    /// A kept publish was settled: its row is deleted (held to retry if that fails).
    pub(crate) fn acked(&self, pid: &[u8; 16]) {
        let mut p = self.pending.borrow_mut();
        p.kept.remove(pid);
        if p.cleared.len() >= MAX_PENDING_CLEARED {
            p.cleared.pop_first();
        }
        p.cleared.insert(*pid);
        drop(p);
        self.write_outbox();
    }

    /// Writes the held outbox changes alone (no receiver snapshot at hand), unless a
    /// failed write is waiting for its retry.
    fn write_outbox(&self) {
        if !self.may_try() {
            return;
        }
        let run = || -> rusqlite::Result<()> {
            let tx = self.db.unchecked_transaction()?;
            Self::outbox_rows(&tx, &self.pending.borrow())?;
            tx.commit()
        };
        match run() {
            Ok(()) => {
                let mut p = self.pending.borrow_mut();
                p.kept.clear();
                p.cleared.clear();
                if !p.any() {
                    drop(p);
                    self.succeeded();
                }
            }
            Err(e) => self.failed("saving the outbox", e),
        }
    }

    fn outbox_rows(tx: &rusqlite::Transaction<'_>, p: &Pending) -> rusqlite::Result<()> {
        for (pid, (ord, frame)) in &p.kept {
            tx.execute(
                "INSERT OR REPLACE INTO outbox (pid, ord, frame) VALUES (?1, ?2, ?3)",
                params![&pid[..], *ord as i64, frame],
            )?;
        }
        for pid in &p.cleared {
            tx.execute("DELETE FROM outbox WHERE pid = ?1", params![&pid[..]])?;
        }
        Ok(())
    }

    /// Whether a write may be tried now (none failed, or its retry time came).
    fn may_try(&self) -> bool {
        self.retry_at
            .get()
            .is_none_or(|t| std::time::Instant::now() >= t)
    }

    fn succeeded(&self) {
        if self.retry_at.take().is_some() {
            tracing::warn!(file = %self.path.display(), "client state: written again");
        }
        self.retry_wait.set(RETRY_FIRST);
    }

    fn failed(&self, what: &str, e: rusqlite::Error) {
        self.failures.set(self.failures.get() + 1);
        let wait = self.retry_wait.get();
        self.retry_at.set(Some(std::time::Instant::now() + wait));
        self.retry_wait.set((wait * 2).min(RETRY_MAX));
        tracing::error!(file = %self.path.display(), error = %e, retry_ms = wait.as_millis() as u64,
            "client state: {what} failed; kept in memory and tried again (acks wait for it)");
    }

    /// When a write that failed is to be tried again (`None`: nothing waits).
    pub(crate) fn retry_at(&self) -> Option<std::time::Instant> {
        if self.pending.borrow().any() {
            self.retry_at.get()
        } else {
            None
        }
    }

    /// Whether every receiver state change given so far is in the file (acks of messages
    /// whose dedup entries are not saved wait for it).
    pub(crate) fn is_saved(&self) -> bool {
        !self.pending.borrow().receiver()
    }

    /// How many writes failed so far (each counted once, its retries too).
    pub(crate) fn write_failures(&self) -> u64 {
        self.failures.get()
    }

    /// The next write is tried whatever the retry time of a failed one (at close).
    pub(crate) fn try_now(&self) {
        self.retry_at.set(None);
    }

    /// The pinned admins saved by [`Store::save_pins`] (`Keyring::export_pins` bytes).
    pub(crate) fn pins(&self) -> Result<Option<Vec<u8>>, PersistError> {
        use rusqlite::OptionalExtension;
        self.db
            .query_row("SELECT bytes FROM pins WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|source| PersistError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// What the keyring takes from the file at start, at `now_ms`: the pinned admins (a grant
    /// of a pinned tree signed by another admin fails, `ConnectError::Keys`), then when
    /// epochs were superseded (`Keyring::restore_superseded`: the grace of an epoch the
    /// keyring holds superseded runs from the earliest time any run saw it superseded, so a
    /// restart does not restart it; a saved time later than `now_ms` — the clock went
    /// back — counts as the grace over). Both are saved again, merged.
    pub(crate) fn restore_keys(
        &self,
        keyring: &mut whispeer_protocol::Keyring,
        now_ms: u64,
    ) -> Result<(), crate::error::ConnectError> {
        if let Some(bytes) = self.pins()? {
            keyring.import_pins(&bytes)?;
        }
        self.save_pins(&keyring.export_pins());
        for (tree, epoch, at) in self.superseded()? {
            keyring.restore_superseded(tree, epoch, at, now_ms);
        }
        self.save_superseded(&keyring.superseded_epochs());
        Ok(())
    }

    /// Saves the keyring's pins (`Keyring::export_pins` bytes), replacing the old ones.
    pub(crate) fn save_pins(&self, bytes: &[u8]) {
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO pins (id, bytes) VALUES (1, ?1)",
            params![bytes],
        ) {
            self.warn("saving the pinned admins", e);
        }
    }

    /// Loads the dedup window and the retained high-water marks into the receiver state.
    ///
    /// A window that cannot be read is [`PersistError::Unreadable`] (damage SQLite finds in
    /// the file) or [`PersistError::Unavailable`] (an I/O error, a lock), and the connect
    /// fails: before, the error was logged and the client ran with an empty window, so
    /// messages it had accepted before the restart were accepted again (adversarial review,
    /// clients). Rows of the wrong type or size are skipped (each costs only itself, see
    /// `drop_malformed`): SQLite reads them fine, they can only have been written by someone
    /// who could as well have deleted them. Dates past their bound are held to it in memory,
    /// and rewritten in the file when it can be written (best-effort, logged).
    pub(crate) fn restore(&self, guard: &mut Guard, now_ms: u64) -> Result<(), PersistError> {
        let mut load = || -> rusqlite::Result<()> {
            self.drop_malformed("seen", SEEN_BAD)?;
            self.drop_malformed("retained", RETAINED_BAD)?;
            self.drop_malformed("seen_window", WINDOW_BAD)?;
            let mut st = self.db.prepare(&format!(
                "SELECT tree, sender, msg_id, expires FROM seen \
                 WHERE expires > ?1 AND NOT coalesce(({SEEN_BAD}), 1)"
            ))?;
            let rows = st.query_map(params![now_ms as i64], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (tree, sender, id, expires) = row?;
                if let (Ok(t), Ok(s), Ok(i)) = (
                    <[u8; 16]>::try_from(tree.as_slice()),
                    <[u8; 32]>::try_from(sender.as_slice()),
                    <[u8; 16]>::try_from(id.as_slice()),
                ) {
                    guard.restore_seen((TreeId(t), s, i), expires as u64, now_ms);
                }
            }
            let mut st = self.db.prepare(&format!(
                "SELECT key, ts, msg_id FROM retained WHERE NOT coalesce(({RETAINED_BAD}), 1)"
            ))?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })?;
            for row in rows {
                let (key, ts, id) = row?;
                if let (Ok(k), Ok(i)) = (
                    <[u8; 32]>::try_from(key.as_slice()),
                    <[u8; 16]>::try_from(id.as_slice()),
                ) {
                    guard.restore_retained(k, ts as u64, i);
                }
            }
            use rusqlite::OptionalExtension;
            let forgot: Option<i64> = self
                .db
                .query_row(
                    &format!(
                        "SELECT forgot_upto FROM seen_window \
                         WHERE id = 1 AND NOT coalesce(({WINDOW_BAD}), 1)"
                    ),
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            guard.restore_forgot_upto(forgot.unwrap_or(0).max(0) as u64);
            // The guard holds restored dates to what an honest run can have written by now
            // (review of session 27, F1); the file is brought down to the same bounds, or a
            // forged date in it would come back at every start (its writes only raise
            // `forgot_upto`, and rows are never rewritten otherwise). Tidying: the guard
            // holds them to their bound at every start, written or not, so a file that
            // cannot be written now (read-only, locked, full) is still loaded; and written
            // only when a date is past its bound (no write lock taken otherwise).
            let (latest_expiry, newest_mark) = guard.restored_bounds(now_ms);
            let (e, m) = (
                i64::try_from(latest_expiry).unwrap_or(i64::MAX),
                i64::try_from(newest_mark).unwrap_or(i64::MAX),
            );
            for (table, col, bound) in [
                ("seen", "expires", e),
                ("retained", "ts", m),
                ("seen_window", "forgot_upto", e),
            ] {
                let past = format!("{col} > ?1 OR {col} < 0");
                let any: bool = self.db.query_row(
                    &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE {past})"),
                    [bound],
                    |r| r.get(0),
                )?;
                if any {
                    self.tidy(
                        &format!("bringing the dates of {table} to their bound"),
                        || {
                            let sql = format!("UPDATE {table} SET {col} = ?1 WHERE {past}");
                            self.db.execute(&sql, [bound]).map(drop)
                        },
                    );
                }
            }
            Ok(())
        };
        load().map_err(self.unreadable("dedup window"))
    }

    /// Loads the messages owed to durables into `core` (after [`Store::restore`], and only
    /// if the window loaded: an owed message is kept only while the window remembers it).
    /// Rows of messages the window forgot, and rows that are not (text, 16-byte blob) at
    /// all, are deleted, so they do not come back at every start (one bad row costs only
    /// itself); rows past the in-memory bound stay saved for a later process.
    ///
    /// The pruning is best-effort (logged): a file that cannot be written still loads.
    /// Rows that cannot be read fail the connect ([`PersistError::Unreadable`]; before,
    /// logged, and the durables were not given what they were owed).
    pub(crate) fn restore_owed(
        &self,
        core: &mut crate::core::ClientCore,
    ) -> Result<(), PersistError> {
        let mut run = || -> rusqlite::Result<()> {
            let mut kept: Vec<(String, [u8; 16])> = Vec::new();
            let mut rows = 0u64;
            {
                let mut st = self.db.prepare("SELECT durable, digest FROM owed")?;
                let mut q = st.query([])?;
                while let Some(r) = q.next()? {
                    rows += 1;
                    let name = r.get_ref(0)?.as_str().ok().map(str::to_owned);
                    let digest = r
                        .get_ref(1)?
                        .as_blob()
                        .ok()
                        .and_then(|b| <[u8; 16]>::try_from(b).ok());
                    if let (Some(name), Some(d)) = (name, digest) {
                        if core.restore_owed(&name, u128::from_le_bytes(d)) {
                            kept.push((name, d));
                        }
                    }
                }
            }
            if kept.len() as u64 == rows {
                return Ok(());
            }
            // Tidying: what is no longer owed was not loaded; a file that cannot be written
            // now still loads, and a later start prunes.
            self.tidy("pruning what durables are no longer owed", || {
                let tx = self.db.unchecked_transaction()?;
                tx.execute("DELETE FROM owed", [])?;
                for (name, d) in &kept {
                    tx.execute(
                        "INSERT OR IGNORE INTO owed (durable, digest) VALUES (?1, ?2)",
                        params![name, &d[..]],
                    )?;
                }
                tx.commit()
            });
            Ok(())
        };
        run().map_err(self.unreadable("messages owed to durables"))
    }

    /// When epochs were superseded, as saved by [`Store::save_superseded`] (`(tree, epoch,
    /// superseded_at_ms)`); rows of the wrong type or size are dropped alone. A negative
    /// time (no honest run writes one) reads as 0: the grace is over.
    pub(crate) fn superseded(&self) -> Result<Vec<(TreeId, u64, u64)>, PersistError> {
        let load = || -> rusqlite::Result<Vec<(TreeId, u64, u64)>> {
            self.drop_malformed("superseded", SUPERSEDED_BAD)?;
            let mut st = self.db.prepare(&format!(
                "SELECT tree, epoch, at FROM superseded WHERE NOT coalesce(({SUPERSEDED_BAD}), 1)"
            ))?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (tree, epoch, at) = row?;
                if let Ok(t) = <[u8; 16]>::try_from(tree.as_slice()) {
                    // Epochs are saved as their 64 bits (an epoch past i64::MAX reads back).
                    out.push((TreeId(t), epoch as u64, at.max(0) as u64));
                }
            }
            Ok(out)
        };
        load().map_err(self.unreadable("epoch supersede times"))
    }

    /// Saves when epochs were superseded (`Keyring::superseded_epochs`), replacing the
    /// saved rows, in one transaction.
    pub(crate) fn save_superseded(&self, rows: &[(TreeId, u64, u64)]) {
        let run = || -> rusqlite::Result<()> {
            let tx = self.db.unchecked_transaction()?;
            tx.execute("DELETE FROM superseded", [])?;
            for (tree, epoch, at) in rows {
                tx.execute(
                    "INSERT OR REPLACE INTO superseded (tree, epoch, at) VALUES (?1, ?2, ?3)",
                    params![
                        &tree.0[..],
                        *epoch as i64,
                        i64::try_from(*at).unwrap_or(i64::MAX)
                    ],
                )?;
            }
            tx.commit()
        };
        if let Err(e) = run() {
            self.warn("saving when epochs were superseded", e);
        }
    }

    /// Writes receiver state changes in one transaction; now and then deletes expired
    /// dedup entries, and high-water marks dated before `marks_before_ms` (the horizon and
    /// skew before now: the receiver refuses messages that old anyway, see
    /// `Guard::expire`; every message moves its topic's mark, so they would pile up).
    ///
    /// The dedup rows are held to the window's capacity `max_seen` (plus an eighth, so
    /// the trim is rare): the rows that expire first go, as the window forgets them for
    /// room (`Guard::make_room`), and the latest expiry among them is kept as the window's
    /// `forgot_upto`, so a restored window still refuses what they covered. (Before, rows
    /// stayed until they expired: a member flooding unsigned messages grew the file by
    /// its rate times the horizon, and every start read them all.)
    #[cfg(test)]
    pub(crate) fn record(
        &self,
        changes: &[Change],
        now_ms: u64,
        marks_before_ms: u64,
        max_seen: usize,
    ) -> bool {
        self.save(changes.to_vec(), now_ms, marks_before_ms, max_seen, || None)
    }

    /// [`Store::record`], taking the changes, with what a repairing write rewrites from
    /// (`repair`, called only when the held changes outgrew their bound). Whatever fails is
    /// held and written with the next write ([`Pending`]); no write is tried before the
    /// retry time of a failed one ([`Store::retry_at`]). True when everything is saved.
    pub(crate) fn save(
        &self,
        changes: Vec<Change>,
        now_ms: u64,
        marks_before_ms: u64,
        max_seen: usize,
        repair: impl FnOnce() -> Option<Repair>,
    ) -> bool {
        if !changes.is_empty() {
            self.pending
                .borrow_mut()
                .add(changes, now_ms, max_seen.max(1));
        }
        if !self.pending.borrow().any() {
            return true;
        }
        if !self.may_try() {
            return false;
        }
        let rebuilt = if self.pending.borrow().repair || self.pending.borrow().repair_owed {
            repair()
        } else {
            None
        };
        let mut since_prune = self.since_prune.get();
        let mut seen_rows = self.seen_rows.get();
        let mut run = || -> rusqlite::Result<()> {
            let p = self.pending.borrow();
            let tx = self.db.unchecked_transaction()?;
            Self::outbox_rows(&tx, &p)?;
            for (key, expires_ms) in &p.seen {
                tx.execute(
                    "INSERT OR REPLACE INTO seen (tree, sender, msg_id, expires)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        &key.0 .0[..],
                        &key.1[..],
                        &key.2[..],
                        i64::try_from(*expires_ms).unwrap_or(i64::MAX)
                    ],
                )?;
                since_prune += 1;
                seen_rows += 1;
            }
            let forgot = p
                .forgot_upto
                .max(rebuilt.as_ref().map_or(0, |r| r.forgot_upto));
            if forgot > 0 {
                tx.execute(
                    "INSERT INTO seen_window (id, forgot_upto) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE
                     SET forgot_upto = max(forgot_upto, excluded.forgot_upto)",
                    params![i64::try_from(forgot).unwrap_or(i64::MAX)],
                )?;
            }
            let retained = |key: &[u8; 32], ts_ms: u64, msg_id: &[u8; 16]| {
                tx.execute(
                    "INSERT OR REPLACE INTO retained (key, ts, msg_id) VALUES (?1, ?2, ?3)",
                    params![
                        &key[..],
                        i64::try_from(ts_ms).unwrap_or(i64::MAX),
                        &msg_id[..]
                    ],
                )
            };
            match &rebuilt {
                // The held changes outgrew their bound: the table becomes what the
                // receiver (or the core) holds now.
                Some(r) if p.repair => {
                    tx.execute("DELETE FROM retained", [])?;
                    for (key, ts_ms, msg_id) in &r.retained {
                        retained(key, *ts_ms, msg_id)?;
                    }
                }
                _ => {}
            }
            match &rebuilt {
                Some(r) if p.repair_owed => {
                    tx.execute("DELETE FROM owed", [])?;
                    for (durable, digest) in &r.owed {
                        tx.execute(
                            "INSERT OR IGNORE INTO owed (durable, digest) VALUES (?1, ?2)",
                            params![durable, &digest.to_le_bytes()[..]],
                        )?;
                    }
                }
                _ => {}
            }
            if rebuilt.is_none() && (p.repair || p.repair_owed) {
                // No snapshot given (a caller without one): nothing to rewrite from.
                return Err(rusqlite::Error::InvalidQuery);
            }
            for (key, (ts_ms, msg_id)) in &p.retained {
                retained(key, *ts_ms, msg_id)?;
            }
            for c in &p.owed {
                match c {
                    Change::Owed { durable, digest } => {
                        tx.execute(
                            "INSERT OR IGNORE INTO owed (durable, digest) VALUES (?1, ?2)",
                            params![durable, &digest.to_le_bytes()[..]],
                        )?;
                    }
                    Change::Paid { durable, digest } => {
                        tx.execute(
                            "DELETE FROM owed WHERE durable = ?1 AND digest = ?2",
                            params![durable, &digest.to_le_bytes()[..]],
                        )?;
                    }
                    Change::OwedForgotten { durable } => {
                        tx.execute("DELETE FROM owed WHERE durable = ?1", params![durable])?;
                    }
                    _ => {}
                }
            }
            if since_prune >= 1024 {
                since_prune = 0;
                let gone = tx.execute(
                    "DELETE FROM seen WHERE expires <= ?1",
                    params![now_ms as i64],
                )?;
                seen_rows = seen_rows.saturating_sub(gone as u64);
                tx.execute(
                    "DELETE FROM retained WHERE ts < ?1",
                    params![marks_before_ms.min(i64::MAX as u64) as i64],
                )?;
            }
            let max = max_seen as u64;
            if seen_rows > max.saturating_add((max / 8).max(1024)) {
                let rows: i64 = tx.query_row("SELECT count(*) FROM seen", [], |r| r.get(0))?;
                let mut rows = rows.max(0) as u64;
                if rows > max {
                    use rusqlite::OptionalExtension;
                    // The expiry of the last row that must go (oldest first): every row
                    // expiring by then goes (whole milliseconds, as the window forgets).
                    let cut: Option<i64> = tx
                        .query_row(
                            "SELECT expires FROM seen ORDER BY expires LIMIT 1 OFFSET ?1",
                            params![(rows - max - 1).min(i64::MAX as u64) as i64],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(cut) = cut {
                        let gone =
                            tx.execute("DELETE FROM seen WHERE expires <= ?1", params![cut])?;
                        rows = rows.saturating_sub(gone as u64);
                        tx.execute(
                            "INSERT INTO seen_window (id, forgot_upto) VALUES (1, ?1)
                             ON CONFLICT (id) DO UPDATE
                             SET forgot_upto = max(forgot_upto, excluded.forgot_upto)",
                            params![cut],
                        )?;
                    }
                }
                seen_rows = rows;
            }
            tx.commit()
        };
        match run() {
            Ok(()) => {
                self.since_prune.set(since_prune);
                self.seen_rows.set(seen_rows);
                *self.pending.borrow_mut() = Pending::default();
                self.succeeded();
                true
            }
            Err(e) => {
                self.failed("writing the dedup window", e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_and_dedup_survive_reopening_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let s = Store::open(&p).unwrap();
            s.keep(&[1; 16], 1, b"frame-1");
            s.keep(&[2; 16], 2, b"frame-2");
            s.acked(&[1; 16]);
            s.record(
                &[
                    Change::Seen {
                        key: (TreeId([1; 16]), [2; 32], [3; 16]),
                        expires_ms: 1_000,
                    },
                    Change::Seen {
                        key: (TreeId([1; 16]), [2; 32], [4; 16]),
                        expires_ms: 10,
                    },
                ],
                5,
                0,
                usize::MAX,
            );
        }
        let s = Store::open(&p).unwrap();
        let out = s.outbox().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0, out[0].1, &out[0].2[..]),
            ([2; 16], 2, &b"frame-2"[..])
        );
        let mut g = Guard::new(Default::default());
        s.restore(&mut g, 100).unwrap();
        assert_eq!(g.seen_len(), 1, "the expired entry is not restored");

        let foreign = dir.path().join("foreign.db");
        let db = Connection::open(&foreign).unwrap();
        db.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(db);
        let e = Store::open(&foreign).unwrap_err();
        assert!(matches!(e, PersistError::Foreign { .. }), "{e}");
        assert_eq!(s.pins().unwrap(), None);
        s.save_pins(b"\x01pins");
        drop(s);
        assert_eq!(
            Store::open(&p).unwrap().pins().unwrap().as_deref(),
            Some(&b"\x01pins"[..])
        );

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let e = Store::open(&garbage).unwrap_err();
        assert!(e.to_string().contains("garbage.db"), "{e}");
    }

    /// The file holds the window's capacity of dedup rows (plus slack), not every message
    /// of the horizon, and a window restored from it refuses what the trimmed rows covered
    /// exactly as the running window did.
    #[test]
    fn the_dedup_rows_are_held_to_the_window_capacity_and_what_they_covered_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let cfg = || crate::core::receive::ReceiveConfig {
            max_entries: 10,
            ..Default::default()
        };
        let mut live = Guard::new(cfg());
        {
            let s = Store::open(&p).unwrap();
            // One past the trim point (capacity + 1024 rows of slack): the trim leaves
            // exactly the capacity, so only the saved `forgot_upto` tells a restored window
            // where the running one started.
            for i in 0..(10 + 1024 + 1u32) {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                let key = (TreeId([1; 16]), [2; 32], id);
                let expires_ms = 1_000 + u64::from(i);
                live.restore_seen(key, expires_ms, 0);
                s.record(&[Change::Seen { key, expires_ms }], 0, 0, 10);
            }
            let rows: i64 =
                s.db.query_row("SELECT count(*) FROM seen", [], |r| r.get(0))
                    .unwrap();
            assert_eq!(rows, 10, "rows kept for a window of 10");
        }
        assert!(live.forgot_upto() > 0);
        let s = Store::open(&p).unwrap();
        let mut g = Guard::new(cfg());
        s.restore(&mut g, 0).unwrap();
        assert_eq!(g.seen_len(), 10);
        assert_eq!(
            g.forgot_upto(),
            live.forgot_upto(),
            "the restored window starts where the running one did"
        );
    }

    /// Owed rows come back only for messages the restored window remembers; rows that are
    /// not (text, 16-byte blob) are dropped alone, never taking the good ones with them,
    /// and everything not kept is deleted from the file.
    #[test]
    fn owed_rows_restore_only_what_the_window_remembers_and_bad_rows_go_alone() {
        use crate::core::receive::digest;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let kept_key = (TreeId([1; 16]), [2; 32], [3; 16]);
        let kept = digest(&kept_key);
        let forgotten = digest(&(TreeId([1; 16]), [2; 32], [4; 16]));
        {
            let s = Store::open(&p).unwrap();
            s.record(
                &[
                    Change::Seen {
                        key: kept_key,
                        expires_ms: 1_000_000,
                    },
                    Change::Owed {
                        durable: "d".into(),
                        digest: kept,
                    },
                    Change::Owed {
                        durable: "d".into(),
                        digest: forgotten,
                    },
                    Change::Owed {
                        durable: "gone".into(),
                        digest: kept,
                    },
                    Change::OwedForgotten {
                        durable: "gone".into(),
                    },
                ],
                5,
                0,
                usize::MAX,
            );
            s.db.execute_batch(
                "INSERT INTO owed VALUES (x'ff', x'00112233445566778899aabbccddeeff');
                 INSERT INTO owed VALUES ('d', 'not a blob');
                 INSERT INTO owed VALUES ('d', x'0011');",
            )
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let mut core = crate::core::ClientCore::new(std::sync::Arc::new(std::sync::RwLock::new(
            whispeer_protocol::Keyring::new(),
        )));
        s.restore(core.guard_mut(), 100).unwrap();
        s.restore_owed(&mut core).unwrap();
        assert_eq!(core.owed_snapshot(), vec![("d".to_owned(), kept)]);
        let rows: i64 =
            s.db.query_row("SELECT count(*) FROM owed", [], |r| r.get(0))
                .unwrap();
        assert_eq!(rows, 1, "what was not kept is deleted from the file");
    }

    /// A value of the wrong type or size in one row (SQLite stores whatever it is given)
    /// failed the whole table's read: every kept publish left unsent, or the dedup window
    /// — and so what durables are owed — not loaded, at every start. Now such rows go alone.
    #[test]
    fn rows_of_the_wrong_type_cost_only_themselves() {
        use crate::core::receive::digest;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let key = (TreeId([1; 16]), [2; 32], [3; 16]);
        {
            let s = Store::open(&p).unwrap();
            s.keep(&[1; 16], 1, b"frame-1");
            s.record(
                &[
                    Change::Seen {
                        key,
                        expires_ms: 1_000_000,
                    },
                    Change::Owed {
                        durable: "d".into(),
                        digest: digest(&key),
                    },
                ],
                5,
                0,
                usize::MAX,
            );
            s.db.execute_batch(
                "INSERT INTO outbox VALUES ('p', 3, x'00');
                 INSERT INTO outbox VALUES (x'00112233445566778899aabbccddeeff', 'x', x'00');
                 INSERT INTO retained VALUES ('k', 1, x'00112233445566778899aabbccddeeff');
                 INSERT INTO seen VALUES (x'0011', x'00', x'00', 'later');
                 INSERT OR REPLACE INTO seen_window VALUES (1, 'soon');",
            )
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let out = s.outbox().unwrap();
        assert_eq!(out.len(), 1, "the good kept publish: {out:?}");
        let mut core = crate::core::ClientCore::new(std::sync::Arc::new(std::sync::RwLock::new(
            whispeer_protocol::Keyring::new(),
        )));
        s.restore(core.guard_mut(), 100).expect("the window loads");
        s.restore_owed(&mut core).unwrap();
        assert_eq!(core.owed_snapshot(), vec![("d".to_owned(), digest(&key))]);
        let count = |t: &str| -> i64 {
            s.db.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            [
                count("outbox"),
                count("retained"),
                count("seen"),
                count("seen_window")
            ],
            [1, 0, 1, 0],
            "the bad rows are gone from the file"
        );
    }

    /// A new file is created in one transaction: a file whose creation a crash cut short
    /// (its application id written, no table) is created again, not refused at every start.
    #[test]
    fn a_state_file_whose_creation_was_cut_short_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        {
            let db = rusqlite::Connection::open(&p).unwrap();
            db.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID};"))
                .unwrap();
        }
        let s = Store::open(&p).expect("created again");
        s.keep(&[1; 16], 1, b"frame-1");
        assert_eq!(s.outbox().unwrap().len(), 1);
    }

    /// A state file of a newer release (a higher schema version) is refused as one — it
    /// was called "not a whispeer client state file" — and left exactly as it was, its
    /// write-ahead log included (a read-write connection checkpointed it as it closed).
    #[test]
    fn a_state_file_of_a_newer_release_is_refused_as_such_and_not_modified() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        let w = Connection::open(&live).unwrap();
        w.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {};
             CREATE TABLE future (x BLOB); INSERT INTO future VALUES (x'0102');",
            SCHEMA_VERSION + 1
        ))
        .unwrap();
        // A copy as a crash of the newer release leaves it: the file and its log.
        let p = dir.path().join("s.db");
        let wal = dir.path().join("s.db-wal");
        std::fs::copy(&live, &p).unwrap();
        std::fs::copy(dir.path().join("live.db-wal"), &wal).unwrap();
        drop(w);
        let before = (std::fs::read(&p).unwrap(), std::fs::read(&wal).unwrap());
        assert!(
            !before.1.is_empty(),
            "the newer release's writes are in its log"
        );
        for _ in 0..2 {
            let e = Store::open(&p).unwrap_err();
            assert!(
                matches!(
                    e,
                    PersistError::Newer {
                        version: 3,
                        supported: 2,
                        ..
                    }
                ),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("written by a newer release")
                    && msg.contains("format version 3, this release reads up to 2")
                    && msg.contains("not modified")
                    && msg.contains("s.db"),
                "{msg}"
            );
            assert!(!msg.contains("not a whispeer client state"), "{msg}");
            let after = (
                std::fs::read(&p).unwrap(),
                std::fs::read(&wal).unwrap_or_default(),
            );
            assert!(
                after == before,
                "the file and its log are untouched (log: {} bytes, was {})",
                after.1.len(),
                before.1.len()
            );
        }
        // Without its log too (a clean shutdown of the newer release).
        let q = dir.path().join("clean.db");
        std::fs::copy(&live, &q).unwrap();
        let bytes = std::fs::read(&q).unwrap();
        assert!(matches!(Store::open(&q), Err(PersistError::Newer { .. })));
        assert_eq!(std::fs::read(&q).unwrap(), bytes);
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Security review: SQLite created the state file with the umask's mode (0644 under
    /// the usual 022), its `-wal` and `-shm` alike: who messaged this client and when, its
    /// pins and kept publishes, readable by every local user. Now 0600, all three.
    #[cfg(unix)]
    #[test]
    fn a_new_state_file_and_its_wal_and_shm_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let s = Store::open(&p).unwrap();
        s.keep(&[1; 16], 1, b"frame-1");
        s.record(
            &[Change::Seen {
                key: (TreeId([1; 16]), [2; 32], [3; 16]),
                expires_ms: 1_000_000,
            }],
            5,
            0,
            usize::MAX,
        );
        let wal = dir.path().join("s.db-wal");
        let shm = dir.path().join("s.db-shm");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "written to the log"
        );
        for f in [&p, &wal, &shm] {
            assert_eq!(mode(f), 0o600, "{}: mode {:03o}", f.display(), mode(f));
        }
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.outbox().unwrap().len(), 1);
        assert_eq!(mode(&p), 0o600);
    }

    /// A symbolic link at the state path (planted in a shared directory: pointing at a
    /// database of another user's making, or at a file of ours to overwrite) is refused,
    /// and what it points at is left as it is — dangling, it is not created either.
    /// Before, SQLite followed it.
    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_at_the_state_path_is_refused_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.db");
        Store::open(&target).unwrap().keep(&[1; 16], 1, b"frame-1");
        let before = std::fs::read(&target).unwrap();
        let link = dir.path().join("s.db");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Store::open(&link).unwrap_err();
        assert!(
            matches!(
                &e,
                PersistError::Unsafe {
                    reason: UnsafeFile::Symlink,
                    path,
                } if path == &link
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("s.db") && msg.contains("symbolic link") && msg.contains("refusing"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), before, "target untouched");
        assert!(!dir.path().join("real.db-wal").exists());

        let nowhere = dir.path().join("nowhere.db");
        let dangling = dir.path().join("d.db");
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        assert!(matches!(
            Store::open(&dangling),
            Err(PersistError::Unsafe {
                reason: UnsafeFile::Symlink,
                ..
            })
        ));
        assert!(!nowhere.exists(), "not created through the link");

        // Nor at its write-ahead log (SQLite would refuse it too, as an I/O error).
        let p = dir.path().join("w.db");
        drop(Store::open(&p).unwrap());
        let other = dir.path().join("other");
        std::fs::write(&other, b"mine").unwrap();
        std::os::unix::fs::symlink(&other, dir.path().join("w.db-wal")).unwrap();
        let e = Store::open(&p).unwrap_err();
        assert!(
            matches!(&e, PersistError::Unsafe { reason: UnsafeFile::Symlink, path }
                if path.ends_with("w.db-wal")),
            "{e}"
        );
        assert_eq!(std::fs::read(&other).unwrap(), b"mine");
    }

    /// A state file (or its `-wal`) writable by group or others is refused and left as it
    /// is; one only readable by others is made 0600 and used; a path that is not a regular
    /// file is refused as such.
    #[cfg(unix)]
    #[test]
    fn a_state_file_writable_by_others_is_refused_and_one_readable_by_others_made_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        Store::open(&p).unwrap().keep(&[1; 16], 1, b"frame-1");
        let chmod = |f: &Path, m: u32| {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(m)).unwrap()
        };
        for m in [0o660, 0o602, 0o666] {
            chmod(&p, m);
            let e = Store::open(&p).unwrap_err();
            assert!(
                matches!(&e, PersistError::Unsafe { reason: UnsafeFile::WritableByOthers { mode }, .. }
                    if *mode == m),
                "{m:03o}: {e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("writable by group or others (mode {m:03o}"))
                    && msg.contains("refusing to use it"),
                "{msg}"
            );
            assert_eq!(mode(&p), m, "left as it is");
        }
        chmod(&p, 0o644);
        let s = Store::open(&p).expect("readable by others: tightened, used");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(s.outbox().unwrap().len(), 1);
        drop(s);

        // A group-writable `-wal` beside it (one a crash left, or another user's).
        let q = dir.path().join("q.db");
        drop(Store::open(&q).unwrap());
        let wal = dir.path().join("q.db-wal");
        std::fs::write(&wal, b"").unwrap();
        chmod(&wal, 0o620);
        assert!(matches!(
            Store::open(&q),
            Err(PersistError::Unsafe {
                reason: UnsafeFile::WritableByOthers { .. },
                ..
            })
        ));

        let d = dir.path().join("a-directory");
        std::fs::create_dir(&d).unwrap();
        let e = Store::open(&d).unwrap_err();
        assert!(
            matches!(
                e,
                PersistError::Unsafe {
                    reason: UnsafeFile::NotRegular { kind: "directory" },
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Review B2: what the guard makes of a filesystem's permissions. A probe file we made
    /// and `fchmod`ed 0600 showing another mode means modes are not kept, another owner
    /// that owners are not; only what is kept is checked. On this (Unix-permission)
    /// filesystem the probe shows both kept, leaves nothing behind, and a file writable
    /// by others is still refused; a directory where no probe can be made keeps the checks.
    #[cfg(unix)]
    #[test]
    fn the_guard_checks_only_the_permissions_a_filesystem_keeps() {
        use guard::Kept;
        let all = Kept::ALL;
        let no_modes = Kept {
            modes: false,
            owners: true,
        };
        let nothing = Kept {
            modes: false,
            owners: false,
        };
        assert_eq!(Kept::shown(0o100600, 1000, 1000), all);
        assert_eq!(Kept::shown(0o100777, 1000, 1000), no_modes, "drvfs, exFAT");
        assert_eq!(Kept::shown(0o100755, 0, 1000), nothing, "vfat of root's");
        assert_eq!(
            Kept::shown(0o100600, 0, 1000),
            Kept {
                modes: true,
                owners: false
            }
        );
        assert_eq!(
            all.check(0o100666, 1000, 1000),
            Err(UnsafeFile::WritableByOthers { mode: 0o666 })
        );
        assert_eq!(
            all.check(0o100620, 1000, 1000),
            Err(UnsafeFile::WritableByOthers { mode: 0o620 })
        );
        assert_eq!(
            all.check(0o100600, 0, 1000),
            Err(UnsafeFile::OtherOwner {
                owner: 0,
                uid: 1000
            })
        );
        assert_eq!(all.check(0o100644, 1000, 1000), Ok(()));
        assert_eq!(no_modes.check(0o100777, 1000, 1000), Ok(()));
        assert_eq!(
            no_modes.check(0o100777, 0, 1000),
            Err(UnsafeFile::OtherOwner {
                owner: 0,
                uid: 1000
            })
        );
        assert_eq!(nothing.check(0o100777, 0, 1000), Ok(()));

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(guard::kept_in(dir.path()), all);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "removed");
        assert_eq!(guard::kept_in(&dir.path().join("missing")), all);
        // A real world-writable state file here: the probe shows modes kept, refused.
        let p = dir.path().join("s.db");
        drop(Store::open(&p).unwrap());
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        assert!(matches!(
            Store::open(&p),
            Err(PersistError::Unsafe {
                reason: UnsafeFile::WritableByOthers { mode: 0o666 },
                ..
            })
        ));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.db"], "no probe file left");
        // One warning per directory.
        let d = dir.path().join("warned");
        assert!(guard::first_warning(&d));
        assert!(!guard::first_warning(&d));
    }

    /// Review B2, on a real filesystem without Unix permissions (exFAT through FUSE on a
    /// loop device; skipped, said on stderr, where it cannot be mounted): the state file
    /// and a local history are created there (their 0600 ignored: they show 0777) and
    /// opened again at the next start — before, refused from then on (WritableByOthers,
    /// mode 777), for good. A directory is still refused as not a regular file.
    #[cfg(unix)]
    #[test]
    fn a_state_file_on_a_filesystem_without_modes_opens_again() {
        let Some(m) = guard::hook::ModelessMount::new() else {
            return;
        };
        let p = m.path.join("s.db");
        Store::open(&p).unwrap().keep(&[1; 16], 1, b"frame-1");
        assert_eq!(mode(&p), 0o777, "the filesystem keeps no modes");
        let s = Store::open(&p).expect("second start");
        assert_eq!(s.outbox().unwrap().len(), 1);
        drop(s);
        // Its log left beside it (as a crash leaves it) is shown 0777 too.
        std::fs::write(m.path.join("s.db-wal"), b"").unwrap();
        assert_eq!(
            Store::open(&p)
                .expect("third start")
                .outbox()
                .unwrap()
                .len(),
            1
        );

        let h = m.path.join("h.db");
        drop(crate::history::LocalHistory::open(&h, ["#"]).unwrap());
        drop(crate::history::LocalHistory::open(&h, ["#"]).expect("history: second start"));

        let d = m.path.join("a-directory");
        std::fs::create_dir(&d).unwrap();
        assert!(matches!(
            Store::open(&d),
            Err(PersistError::Unsafe {
                reason: UnsafeFile::NotRegular { .. },
                ..
            })
        ));
    }

    /// Review B3: a `-wal`/`-shm` found by the `lstat` and gone when opened (another
    /// connection closed the last one in between; SQLite checkpointed and removed them) is
    /// absent, not an I/O error failing the start ("No such file or directory").
    #[cfg(unix)]
    #[test]
    fn a_wal_removed_between_its_check_steps_counts_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        Store::open(&p).unwrap().keep(&[1; 16], 1, b"frame-1");
        // As a crash or a still-open connection leaves them.
        for side in ["s.db-wal", "s.db-shm"] {
            std::fs::write(dir.path().join(side), b"").unwrap();
        }
        let removed = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let r = removed.clone();
        guard::hook::set_between_lstat_and_open(move |side| {
            std::fs::remove_file(side).unwrap();
            r.borrow_mut().push(side.file_name().unwrap().to_owned());
        });
        let opened = Store::open(&p);
        guard::hook::set_between_lstat_and_open(|_| {});
        let s = opened.expect("the log and index gone in between: absent");
        assert_eq!(*removed.borrow(), ["s.db-wal", "s.db-shm"], "both raced");
        assert_eq!(s.outbox().unwrap().len(), 1);
        drop(s);

        // LocalHistory goes through the same check.
        let h = dir.path().join("h.db");
        drop(crate::history::LocalHistory::open(&h, ["#"]).unwrap());
        std::fs::write(dir.path().join("h.db-wal"), b"").unwrap();
        guard::hook::set_between_lstat_and_open(|side| std::fs::remove_file(side).unwrap());
        let opened = crate::history::LocalHistory::open(&h, ["#"]);
        guard::hook::set_between_lstat_and_open(|_| {});
        opened.expect("local history: the log gone in between is absent");
    }

    /// Dates past `i64::MAX` (a replay horizon of `Duration::MAX`) are saved as `i64::MAX`,
    /// not wrapped negative (such rows were skipped at the next start, then raised).
    #[test]
    fn dates_past_i64_max_are_saved_saturated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let s = Store::open(&p).unwrap();
        s.record(
            &[Change::Seen {
                key: (TreeId([1; 16]), [2; 32], [3; 16]),
                expires_ms: u64::MAX,
            }],
            5,
            0,
            usize::MAX,
        );
        let e: i64 =
            s.db.query_row("SELECT expires FROM seen", [], |r| r.get(0))
                .unwrap();
        assert_eq!(e, i64::MAX);
    }

    // ---- Adversarial review (clients), finding 1: a state that cannot be loaded is refused ----

    /// A state file with a row in every table the client loads at start (the `seen` table
    /// spread over several pages).
    fn populated(p: &Path) -> crate::core::receive::DedupKey {
        use crate::core::receive::digest;
        let s = Store::open(p).unwrap();
        s.keep(&[1; 16], 1, b"frame-1");
        let first = (TreeId([1; 16]), [2; 32], [0; 16]);
        let mut changes: Vec<Change> = (0..2000u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                Change::Seen {
                    key: (TreeId([1; 16]), [2; 32], id),
                    expires_ms: 10_000_000,
                }
            })
            .collect();
        changes.push(Change::Retained {
            key: [7; 32],
            ts_ms: 50,
            msg_id: [8; 16],
        });
        changes.push(Change::Owed {
            durable: "d".into(),
            digest: digest(&first),
        });
        s.record(&changes, 0, 0, usize::MAX);
        s.save_pins(&whispeer_protocol::Keyring::new().export_pins());
        s.save_superseded(&[(TreeId([1; 16]), 0, 5_000)]);
        first
    }

    /// Overwrites the root page of `table` in the database at `p` (closed: its write-ahead
    /// log checkpointed into it) with `0xff` bytes — damage in the middle of the file, as
    /// a bad sector or a stray write leaves it. Returns the page number.
    fn damage(p: &Path, table: &str) -> i64 {
        use std::io::{Seek, SeekFrom, Write};
        let db = Connection::open(p).unwrap();
        let root: i64 = db
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        let (size, pages): (i64, i64) = db
            .query_row(
                "SELECT page_size, page_count FROM pragma_page_size, pragma_page_count",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        drop(db);
        assert!(
            root > 1 && root < pages,
            "{table}: page {root} of {pages}, in the middle"
        );
        assert!(!p.with_extension("db-wal").exists(), "checkpointed");
        let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.seek(SeekFrom::Start(((root - 1) * size) as u64)).unwrap();
        f.write_all(&vec![0xff; size as usize]).unwrap();
        root
    }

    /// Each part the client loads at start, by its name in [`PersistError::Unreadable`].
    fn load_part(s: &Store, part: &str) -> Result<(), PersistError> {
        let mut core = crate::core::ClientCore::new(std::sync::Arc::new(std::sync::RwLock::new(
            whispeer_protocol::Keyring::new(),
        )));
        match part {
            "dedup window" => s.restore(core.guard_mut(), 100),
            "outbox" => s.outbox().map(drop),
            "messages owed to durables" => {
                s.restore(core.guard_mut(), 100)?;
                s.restore_owed(&mut core)
            }
            "epoch supersede times" => s.superseded().map(drop),
            _ => unreachable!(),
        }
    }

    /// Damage SQLite finds in the middle of the file — in the dedup window, the retained
    /// marks, the outbox, what durables are owed, the supersede times — is a typed error
    /// naming the file, the part and what to do; never an empty part in its place (before:
    /// an error in the log, and the client ran with an empty dedup window, so messages it
    /// had accepted were accepted again after the restart). The undamaged file loads.
    #[test]
    fn a_state_file_damaged_in_the_middle_is_refused_naming_the_part_it_cannot_load() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.db");
        let first = populated(&good);
        {
            let s = Store::open(&good).unwrap();
            let mut g = Guard::new(Default::default());
            s.restore(&mut g, 100).unwrap();
            assert!(g.is_seen(&first) && g.seen_len() == 2000);
            for part in [
                "dedup window",
                "outbox",
                "messages owed to durables",
                "epoch supersede times",
            ] {
                load_part(&s, part).unwrap();
            }
        }
        for (table, part) in [
            ("seen", "dedup window"),
            ("retained", "dedup window"),
            ("outbox", "outbox"),
            ("owed", "messages owed to durables"),
            ("superseded", "epoch supersede times"),
        ] {
            let p = dir.path().join(format!("{table}.db"));
            std::fs::copy(&good, &p).unwrap();
            damage(&p, table);
            let s = Store::open(&p).unwrap_or_else(|e| panic!("{table}: opens ({e})"));
            let e = load_part(&s, part).expect_err(table);
            let PersistError::Unreadable {
                path,
                part: named,
                source,
            } = &e
            else {
                panic!("{table}: {e:?}")
            };
            assert_eq!((path, *named), (&p, part), "{table}");
            assert_eq!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt),
                "{table}: {source}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!(
                    "client state file {}: cannot load its {part}",
                    p.display()
                )) && msg.contains("not starting with it empty")
                    && msg.contains("move it aside"),
                "{msg}"
            );
        }
    }

    /// The parts the client loads at start, by their names in the errors.
    const PARTS: [&str; 4] = [
        "dedup window",
        "outbox",
        "messages owed to durables",
        "epoch supersede times",
    ];

    /// A populated state file with rows its start tidies: a malformed row in each table
    /// the reads skip, dates past their bound, a message owed that the window forgot.
    fn untidy(p: &Path) {
        populated(p);
        let s = Store::open(p).unwrap();
        s.db.execute_batch(&format!(
            "INSERT INTO outbox VALUES ('p', 3, x'00');
             INSERT INTO retained VALUES ('k', 1, x'00112233445566778899aabbccddeeff');
             INSERT INTO seen VALUES (x'0011', x'00', x'00', 'later');
             INSERT INTO superseded VALUES ('t', 1, 2);
             INSERT OR REPLACE INTO seen_window VALUES (1, {big});
             UPDATE retained SET ts = {big};
             INSERT INTO owed VALUES ('d', x'00112233445566778899aabbccddeeff');",
            big = i64::MAX
        ))
        .unwrap();
    }

    /// How many rows the start would tidy away or rewrite in the file at `p`.
    fn untidy_rows(p: &Path) -> i64 {
        let db = Connection::open(p).unwrap();
        let n = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
        [
            format!("SELECT count(*) FROM outbox WHERE {OUTBOX_BAD}"),
            format!("SELECT count(*) FROM retained WHERE {RETAINED_BAD} OR ts > 1000000000"),
            format!("SELECT count(*) FROM seen WHERE {SEEN_BAD}"),
            format!("SELECT count(*) FROM superseded WHERE {SUPERSEDED_BAD}"),
            "SELECT count(*) FROM seen_window WHERE forgot_upto > 1000000000".into(),
            "SELECT count(*) FROM owed WHERE digest = x'00112233445566778899aabbccddeeff'".into(),
        ]
        .iter()
        .map(|q| n(q))
        .sum()
    }

    /// Loads every part; what came of the dedup window and the outbox.
    fn load_all(s: &Store) -> (usize, usize) {
        for part in PARTS {
            load_part(s, part).unwrap_or_else(|e| panic!("{part}: {e}"));
        }
        let mut g = Guard::new(Default::default());
        s.restore(&mut g, 100).unwrap();
        (g.seen_len(), s.outbox().unwrap().len())
    }

    /// Review of e8ad48c (F3): the writes a start only tidies with — dropping malformed
    /// rows, bringing dates down to their bound, pruning what durables are no longer owed —
    /// failed the connect on a file that could not be written (a read-only mount, a full
    /// disk), reported as damage with the advice to move it aside (a new file accepts again
    /// what this client accepted). The reads skip malformed rows themselves; a file that
    /// cannot be written loads whole, untouched, and a later start tidies it.
    #[test]
    fn a_state_file_that_cannot_be_written_loads_and_is_tidied_later() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        untidy(&p);
        let before = untidy_rows(&p);
        assert_eq!(before, 7);
        {
            let s = Store::open(&p).unwrap();
            s.db.execute_batch("PRAGMA query_only = 1").unwrap();
            assert_eq!(
                load_all(&s),
                (2000, 1),
                "the good rows, the bad ones skipped"
            );
        }
        assert_eq!(untidy_rows(&p), before, "nothing written");
        let s = Store::open(&p).unwrap();
        assert_eq!(load_all(&s), (2000, 1));
        assert_eq!(untidy_rows(&p), 0, "tidied once it could be written");
    }

    /// Review of e8ad48c (F3): another process holding the file's write lock (past the 5 s
    /// wait) made the start fail, called damage: the malformed rows' DELETE ran first, rows
    /// or none. Reading needs no write lock (write-ahead log): a file with nothing to tidy
    /// loads while another connection holds `BEGIN IMMEDIATE`, without waiting; one with
    /// rows to tidy loads too, the tidying logged and left for later.
    #[test]
    fn a_state_file_another_writer_holds_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (clean, messy) = (dir.path().join("clean.db"), dir.path().join("messy.db"));
        populated(&clean);
        untidy(&messy);
        for (p, waits) in [(&clean, false), (&messy, true)] {
            let other = Connection::open(p).unwrap();
            other.execute_batch("BEGIN IMMEDIATE").unwrap();
            let s = Store::open(p).expect("opens");
            // Every lock the load asks for while `other` holds the write lock reaches this
            // handler, which counts it and gives up at once (SQLITE_BUSY, no waiting).
            static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            fn count_busy(_: i32) -> bool {
                BUSY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            BUSY.store(0, std::sync::atomic::Ordering::Relaxed);
            s.db.busy_handler(Some(count_busy)).unwrap();
            assert_eq!(load_all(&s), (2000, 1), "{}", p.display());
            let busy = BUSY.load(std::sync::atomic::Ordering::Relaxed);
            if waits {
                assert!(busy > 0, "the tidy-up asked for the write lock");
            } else {
                assert_eq!(busy, 0, "no write lock asked for");
            }
            other.execute_batch("ROLLBACK").unwrap();
        }
        assert_eq!(untidy_rows(&messy), 7, "left for a later start");
    }

    /// Review of e8ad48c (F3): a part that cannot be read now for a reason that says
    /// nothing against the file (another process's lock past the wait, a read-only file, a
    /// full disk, an I/O error) is `Unavailable`, whose advice is to retry and keep the
    /// file — never the damaged file's "move it aside to start afresh"; damage
    /// (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) is still `Unreadable` (with a real file:
    /// `a_state_file_damaged_in_the_middle_is_refused_naming_the_part_it_cannot_load`).
    #[test]
    fn a_state_file_that_cannot_be_read_now_is_not_called_damaged() {
        use rusqlite::ffi;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let s = Store::open(&p).unwrap();
        let failure = |code| rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_READ,
            ffi::SQLITE_CANTOPEN,
        ] {
            let e = s.unreadable("dedup window")(failure(code));
            let PersistError::Unavailable { path, part, .. } = &e else {
                panic!("{code}: {e:?}")
            };
            assert_eq!((path, *part), (&p, "dedup window"));
            let msg = e.to_string();
            assert!(
                msg.contains("not known to be damaged")
                    && msg.contains("keeping the file")
                    && !msg.contains("move it aside")
                    && !msg.contains("backup"),
                "{msg}"
            );
        }
        for code in [ffi::SQLITE_CORRUPT, ffi::SQLITE_NOTADB] {
            let e = s.unreadable("outbox")(failure(code));
            assert!(
                matches!(e, PersistError::Unreadable { part: "outbox", .. }),
                "{code}: {e:?}"
            );
            assert!(e.to_string().contains("move it aside"));
        }
    }

    /// The same through `connect`: a state file whose dedup window cannot be read fails the
    /// connect with `ConnectError::State(PersistError::Unreadable)`, before anything is
    /// dialed (the URL has no relay behind it).
    #[tokio::test]
    async fn connect_fails_with_a_state_file_whose_dedup_window_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        populated(&p);
        damage(&p, "seen");
        let e = crate::Client::builder()
            .with(crate::Tcp::new("127.0.0.1:9"))
            .with(crate::Encryption::new())
            .with(Persistence::sqlite(&p))
            .connect()
            .await
            .expect_err("refused");
        assert!(
            matches!(
                &e,
                crate::ConnectError::State(PersistError::Unreadable {
                    part: "dedup window",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    /// A torn last write is no such error (the recovery is SQLite's, unchanged): a crash in
    /// the middle of a transaction leaves its frames in the write-ahead log cut short, and
    /// the file opens with every transaction committed before it — the dedup entries of the
    /// earlier writes are there, the torn one's are not, and nothing fails.
    #[test]
    fn a_torn_last_write_in_the_write_ahead_log_is_dropped_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (p, crash) = (dir.path().join("s.db"), dir.path().join("crash"));
        std::fs::create_dir(&crash).unwrap();
        let (a, b) = (
            (TreeId([1; 16]), [2; 32], [3; 16]),
            (TreeId([1; 16]), [2; 32], [4; 16]),
        );
        let s = Store::open(&p).unwrap();
        for key in [a, b] {
            s.record(
                &[Change::Seen {
                    key,
                    expires_ms: 1_000_000,
                }],
                0,
                0,
                usize::MAX,
            );
        }
        // What a crash leaves: the file and its log as they are (the log not checkpointed
        // while the store is open), the log's last frame — the commit of `b` — cut short.
        let wal = dir.path().join("s.db-wal");
        let wal_len = std::fs::metadata(&wal).unwrap().len();
        assert!(wal_len > 0);
        std::fs::copy(&p, crash.join("s.db")).unwrap();
        std::fs::copy(&wal, crash.join("s.db-wal")).unwrap();
        std::fs::copy(&wal, crash.join("whole-wal")).unwrap();
        drop(s);
        let torn = std::fs::OpenOptions::new()
            .write(true)
            .open(crash.join("s.db-wal"))
            .unwrap();
        torn.set_len(wal_len - 100).unwrap();
        drop(torn);
        let s = Store::open(&crash.join("s.db")).expect("a torn tail opens");
        let mut g = Guard::new(Default::default());
        s.restore(&mut g, 100).expect("and loads");
        assert!(g.is_seen(&a), "committed before the torn write: kept");
        assert!(!g.is_seen(&b), "the torn write: dropped");
        drop(s);
        // Control: the same log whole holds both.
        for f in ["s.db", "s.db-wal", "s.db-shm"] {
            let _ = std::fs::remove_file(crash.join(f));
        }
        std::fs::copy(&p, crash.join("s.db")).unwrap();
        std::fs::rename(crash.join("whole-wal"), crash.join("s.db-wal")).unwrap();
        let s = Store::open(&crash.join("s.db")).unwrap();
        let mut g = Guard::new(Default::default());
        s.restore(&mut g, 100).unwrap();
        assert!(g.is_seen(&a) && g.is_seen(&b));
    }

    // ---- Finding 2: the previous epoch's grace survives a restart ----

    /// A client restarted part-way through the previous epoch's grace (its application adds
    /// both epochs' grants again, so its keyring sees the rotation "now") refuses the old
    /// epoch's live messages once the grace that started at the first sight of the rotation
    /// is over — not a grace from every start. The time is kept in the state file and
    /// restored by `connect` (`Store::restore_keys`); time is passed in.
    #[test]
    fn a_restart_does_not_restart_the_previous_epochs_grace() {
        use rand::SeedableRng;
        use whispeer_protocol::{Keyring, TreeKey};
        const GRACE: u64 = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(41);
        let e0 = TreeKey::generate_with("team", &mut rng).unwrap();
        let e1 = e0.rotate(u64::MAX, &mut rng).unwrap();
        let (old, tree) = (e0.cert().keys().key_id(), e0.tree_id());
        // One process start at `now`: the grants added, then the state file opened, as
        // `connect` does.
        let start = |now: u64| {
            let mut kr = Keyring::with_grace(GRACE);
            kr.add_tree_key_at(&e0, now).unwrap();
            kr.add_tree_key_at(&e1, now).unwrap();
            Store::open(&p).unwrap().restore_keys(&mut kr, now).unwrap();
            kr
        };
        let live = |kr: &Keyring, now: u64| kr.accepts_message(&old, 0, now, true);
        let t0 = 1_700_000_000_000;
        let first = start(t0);
        assert!(live(&first, t0 + GRACE) && !live(&first, t0 + GRACE + 1));
        // Restarted half-way, then again just before the end: the first grace holds.
        for restart in [t0 + GRACE / 2, t0 + GRACE - 1] {
            let kr = start(restart);
            assert!(live(&kr, t0 + GRACE), "within the grace");
            assert!(
                !live(&kr, t0 + GRACE + 1),
                "restarted at t0 + {}: the old epoch is refused once the first grace is over",
                restart - t0
            );
            assert!(
                kr.accepts_message(&old, 0, t0 + GRACE + 1, false),
                "history still opens"
            );
        }
        assert_eq!(
            Store::open(&p).unwrap().superseded().unwrap(),
            [(tree, 0, t0)],
            "saved once, the earliest time"
        );
        // A start whose clock reads before the saved time (it went back): the grace is
        // taken as over — the safe choice — and saved so.
        let back = start(t0 - 60_000);
        assert!(!live(&back, t0 - 60_000));
        assert_eq!(
            Store::open(&p).unwrap().superseded().unwrap(),
            [(tree, 0, 0)]
        );
    }

    fn seen(i: u32, expires_ms: u64) -> Change {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        Change::Seen {
            key: (TreeId([1; 16]), [2; 32], id),
            expires_ms,
        }
    }

    /// Review (finding A): a write that failed — here another writer holding the lock
    /// past the busy timeout — dropped its whole batch (a message taken and acknowledged
    /// meanwhile was accepted again after a restart), and a failed `keep` dropped the QoS
    /// ≥ 1 publish from the saved outbox. Both are held and written with the next write;
    /// until then the store says the receiver state is not saved (acks wait for it).
    #[test]
    fn a_failed_write_is_held_and_written_with_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let s = Store::open(&p).unwrap();
        // Every lock a write asks for while `other` holds the write lock reaches this
        // handler, which counts it and gives up at once (SQLITE_BUSY, no waiting).
        static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn count_busy(_: i32) -> bool {
            BUSY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false
        }
        let busy = || BUSY.load(std::sync::atomic::Ordering::Relaxed);
        s.db.busy_handler(Some(count_busy)).unwrap();
        let other = Connection::open(&p).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(!s.record(&[seen(1, 1_000)], 0, 0, 100), "the write failed");
        assert!(busy() > 0, "it asked for the lock");
        assert_eq!(s.write_failures(), 1);
        assert!(!s.is_saved());
        assert!(s.retry_at().is_some(), "a retry is due");
        s.try_now();
        // The next failure's retry is an hour away: nothing below depends on timing.
        s.retry_wait.set(std::time::Duration::from_secs(3600));
        s.keep(&[9; 16], 1, b"frame-9");
        let tried = busy();
        let due = s.retry_at().expect("the keep failed: a retry is due");
        assert!(due > std::time::Instant::now() + std::time::Duration::from_secs(60));
        s.keep(&[8; 16], 2, b"frame-8");
        // Nothing is tried before the retry time of the failure (a locked file costs the
        // busy timeout at every try): held, and the lock not asked for.
        assert!(!s.record(&[seen(2, 1_000)], 0, 0, 100));
        assert_eq!(busy(), tried, "no write tried before the retry time");
        assert_eq!(s.retry_at(), Some(due), "nothing failed again");
        s.acked(&[8; 16]);
        other.execute_batch("ROLLBACK").unwrap();
        s.try_now();
        assert!(s.record(&[], 0, 0, 100), "written with the next write");
        assert!(s.is_saved());
        assert_eq!(s.retry_at(), None);
        drop(s);

        let s = Store::open(&p).unwrap();
        let out = s.outbox().unwrap();
        assert_eq!(
            out.iter().map(|o| (o.0, o.1)).collect::<Vec<_>>(),
            vec![([9; 16], 1)],
            "the kept publish whose write failed is saved; the settled one is not"
        );
        let mut g = Guard::new(Default::default());
        s.restore(&mut g, 0).unwrap();
        assert_eq!(g.seen_len(), 2, "both dedup entries are saved");
        for i in [1, 2] {
            let Change::Seen { key, .. } = seen(i, 0) else {
                unreachable!()
            };
            assert!(g.is_seen(&key), "entry {i}");
        }
    }

    /// What failed writes hold is bounded: dedup entries beyond the window's capacity go,
    /// those expiring first, with `forgot_upto` raised over them (a restored window still
    /// refuses what they covered); retained marks beyond their bound are rewritten from the
    /// receiver's snapshot at the next write.
    #[test]
    fn what_failed_writes_hold_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let s = Store::open(&p).unwrap();
        s.db.busy_timeout(std::time::Duration::from_millis(1))
            .unwrap();
        s.record(
            &[Change::Retained {
                key: [1; 32],
                ts_ms: 5,
                msg_id: [1; 16],
            }],
            0,
            0,
            10,
        );
        let other = Connection::open(&p).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut changes: Vec<Change> = (0..30u32).map(|i| seen(i, 1_000 + u64::from(i))).collect();
        changes.extend((0..2000u32).map(|i| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            Change::Retained {
                key,
                ts_ms: 10,
                msg_id: [2; 16],
            }
        }));
        assert!(!s.record(&changes, 0, 0, 10));
        {
            let held = s.pending.borrow();
            assert_eq!(held.seen.len(), 10, "the window's capacity");
            assert_eq!(held.forgot_upto, 1_019, "over the 20 left out");
            assert!(held.repair && held.retained.is_empty(), "marks: rewritten");
        }
        other.execute_batch("ROLLBACK").unwrap();
        s.try_now();
        let repaired = s.save(vec![], 0, 0, 10, || {
            Some(Repair {
                retained: vec![([3; 32], 7, [3; 16])],
                forgot_upto: 0,
                owed: vec![("d".into(), 42)],
            })
        });
        assert!(repaired);
        drop(s);
        let s = Store::open(&p).unwrap();
        let mut g = Guard::new(crate::core::receive::ReceiveConfig {
            max_entries: 10,
            ..Default::default()
        });
        s.restore(&mut g, 0).unwrap();
        assert_eq!(g.seen_len(), 10);
        assert_eq!(g.forgot_upto(), 1_019);
        let marks: Vec<(Vec<u8>, i64)> =
            s.db.prepare("SELECT key, ts FROM retained")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        assert_eq!(marks, vec![(vec![3; 32], 7)], "the snapshot's marks");
        let owed: i64 =
            s.db.query_row("SELECT count(*) FROM owed", [], |r| r.get(0))
                .unwrap();
        assert_eq!(owed, 0, "owed rows are rewritten only past their own bound");
    }
}
