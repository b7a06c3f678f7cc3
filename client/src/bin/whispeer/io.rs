//! Where keys and identities come from (flags, files, environment, stdin), secret files
//! with mode 0600, and stdout that tolerates a closed pipe.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use whispeer::printable::{escape_hostile, is_terminal_hostile};

use anyhow::{Context, Result};
use clap::Args;
use whispeer::protocol::Dictionary;
use whispeer::{Grant, Identity, Keyring, TreeKey};

use crate::usage;

/// Environment variable with key strings, or the path of a key file.
pub const ENV_KEY: &str = "WHISPEER_KEY";

/// Most bytes read from a secret file (key, identity, relay account key) or from stdin
/// keys: key strings are short, an invite (the longest) at most
/// [`whispeer::protocol::text::MAX_INVITE_CHARS`] characters. Past it the input is no key
/// file (`/dev/zero`, a log named by mistake) and reading it whole took memory without end.
pub const MAX_KEY_INPUT: u64 = 4 << 20;

/// Most bytes read from a dictionary file: its `wsdict1…` string (a raw dictionary is at
/// most [`whispeer::protocol::dict::MAX_DICT_LEN`] bytes, the string under twice that).
const MAX_DICT_INPUT: u64 = 1 << 20;

/// Reads `r` whole into `out`, refusing more than `limit` bytes (`what` names it).
pub fn read_bounded(mut r: impl Read, limit: u64, what: &str, out: &mut Vec<u8>) -> Result<()> {
    r.by_ref()
        .take(limit + 1)
        .read_to_end(out)
        .with_context(|| format!("cannot read {what}"))?;
    if out.len() as u64 > limit {
        anyhow::bail!("{what} is larger than {limit} bytes: it holds no key string");
    }
    Ok(())
}
/// Environment variable with an identity secret string, or the path of an identity file.
pub const ENV_IDENTITY: &str = "WHISPEER_IDENTITY";

/// Prints a warning on stderr, as one line with every control and bidi character escaped
/// ([`diagnostic`]): warnings name topics and carry errors with text others chose (review
/// F4). Callers pass the raw text; escaping it first would escape it twice.
pub fn warn(msg: impl std::fmt::Display) {
    eprintln!("warning: {}", diagnostic(&msg.to_string()));
}

/// Prints a line on stdout and flushes it (so pipes see each line at once).
pub fn println_flush(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Prints a line on stdout; a closed pipe (`| head`) is not an error worth reporting.
pub fn print_or_exit(line: &str) -> Result<()> {
    match println_flush(line) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// A tree admin key or a grant, as read from a key string.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a handful of keys per process
pub enum AnyKey {
    /// `wstree1…`: the whole tree, and the power to issue grants.
    Tree(TreeKey),
    /// `wskey1…`: a subtree or one topic.
    Grant(Grant),
}

impl AnyKey {
    /// Parses `wstree1…` or `wskey1…`.
    pub fn parse(s: &str) -> Result<AnyKey> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("wstree1") {
            return Ok(AnyKey::Tree(
                TreeKey::from_key_string(s).context("invalid tree key")?,
            ));
        }
        if lower.starts_with("wskey1") {
            return Ok(AnyKey::Grant(
                Grant::from_key_string(s).context("invalid grant key")?,
            ));
        }
        let kind = lower.split_once('1').map(|(h, _)| h).unwrap_or("");
        match kind {
            "wssec" | "wsid" | "wspk" | "wsinv" => anyhow::bail!(
                "expected a key string (wstree1… or wskey1…) but got a '{kind}1…' string"
            ),
            _ => anyhow::bail!("not a key string: expected 'wstree1…' or 'wskey1…'"),
        }
    }

    /// The grant this key gives (the whole tree for an admin key).
    pub fn grant(&self) -> Grant {
        match self {
            AnyKey::Tree(t) => t.grant_all(),
            AnyKey::Grant(g) => g.clone(),
        }
    }
}

/// A keyring holding these keys.
pub fn keyring(keys: &[AnyKey]) -> Result<Keyring> {
    let mut k = Keyring::new();
    for key in keys {
        k.add_grant(key.grant()).context("cannot add key")?;
    }
    Ok(k)
}

/// The key strings in a text: one per line (or separated by whitespace or commas),
/// `#` starts a comment line.
pub fn split_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ','))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `--key` / `--key-file`, falling back to `WHISPEER_KEY`.
#[derive(Debug, Args, Clone, Default)]
pub struct KeyArgs {
    /// A key string (wstree1… or wskey1…); repeatable. Visible to other users in the process
    /// list: prefer --key-file or WHISPEER_KEY.
    #[arg(long = "key", value_name = "KEY")]
    pub keys: Vec<String>,
    /// A file of key strings, one per line ('#' comments); repeatable.
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_files: Vec<PathBuf>,
    /// The key strings once read: each key file is read exactly once (a FIFO such as
    /// `<(cat key)` can be read only once), however often the keys are asked for.
    #[arg(skip)]
    read: ReadOnce,
}

/// Key strings read from their sources, one list per source (each `--key`, each key file,
/// `WHISPEER_KEY`), kept for later calls (never printed by `Debug`).
#[derive(Clone, Default)]
struct ReadOnce(std::sync::OnceLock<Vec<zeroize::Zeroizing<Vec<String>>>>);

impl std::fmt::Debug for ReadOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "ReadOnce(…)"
        } else {
            "ReadOnce(unread)"
        })
    }
}

impl KeyArgs {
    /// The key strings given by flags, else by `WHISPEER_KEY` (key strings, or a file path).
    /// The sources are read on the first call only; later calls return the same strings.
    pub fn texts(&self) -> Result<Vec<String>> {
        Ok(self
            .sources()?
            .iter()
            .flat_map(|g| g.iter().cloned())
            .collect())
    }

    /// The key strings of each source (each `--key`, each key file, `WHISPEER_KEY`).
    fn sources(&self) -> Result<&[zeroize::Zeroizing<Vec<String>>]> {
        if self.read.0.get().is_none() {
            let groups = self.read_texts()?;
            let _ = self.read.0.set(groups);
        }
        Ok(self.read.0.get().map(Vec::as_slice).unwrap_or_default())
    }

    fn read_texts(&self) -> Result<Vec<zeroize::Zeroizing<Vec<String>>>> {
        let mut out = Vec::new();
        if !self.keys.is_empty() {
            warn(
                "--key puts a secret on the command line, where other users can see it \
                 (ps, shell history); prefer --key-file FILE or WHISPEER_KEY",
            );
            for k in &self.keys {
                out.push(zeroize::Zeroizing::new(split_keys(k)));
            }
        }
        for f in &self.key_files {
            let text = read_secret_file(f)?;
            let keys = split_keys(&text);
            if keys.is_empty() {
                anyhow::bail!("key file {} holds no key", f.display());
            }
            out.push(zeroize::Zeroizing::new(keys));
        }
        if out.iter().all(|g| g.is_empty()) {
            if let Some(text) = env_secret(ENV_KEY, looks_like_key)? {
                out.push(zeroize::Zeroizing::new(split_keys(&text)));
            }
        }
        Ok(out)
    }

    /// The parsed keys (possibly none). Dictionaries (`wsdict1…`) among them are left to
    /// [`KeyArgs::dictionaries`].
    pub fn load(&self) -> Result<Vec<AnyKey>> {
        self.texts()?
            .iter()
            .filter(|s| !is_dict_string(s))
            .enumerate()
            .map(|(i, s)| AnyKey::parse(s).with_context(|| format!("key #{}", i + 1)))
            .collect()
    }

    /// Adds the zstd dictionaries (`wsdict1…` lines) among the keys to `keyring`, each
    /// for the trees of the tree keys and grants of the same source (key file, `--key`,
    /// `WHISPEER_KEY`): a key file `invite open --out` wrote serves its grant's tree only,
    /// so a member of another tree cannot make her messages read it (PROTOCOL §4.6.1). A
    /// source holding dictionaries and no key adds them for every tree, as `--dict` does.
    pub fn add_dictionaries_to(&self, keyring: &mut Keyring) -> Result<()> {
        for group in self.sources()? {
            let dicts = parse_dictionaries(group)?;
            if dicts.is_empty() {
                continue;
            }
            let mut trees = Vec::new();
            for k in group.iter().filter(|s| !is_dict_string(s)) {
                let t = AnyKey::parse(k)?.grant().cert().keys().tree_id();
                if !trees.contains(&t) {
                    trees.push(t);
                }
            }
            for d in dicts {
                if trees.is_empty() {
                    keyring.try_add_dictionary(d.clone())?;
                }
                for t in &trees {
                    keyring.add_dictionary_for(*t, d.clone())?;
                }
            }
        }
        Ok(())
    }

    /// The parsed keys; a usage error when there are none.
    pub fn require(&self) -> Result<Vec<AnyKey>> {
        let keys = self.load()?;
        if keys.is_empty() {
            usage!("no key given: use --key-file FILE, set {ENV_KEY}, or --key KEY");
        }
        Ok(keys)
    }
}

fn looks_like_key(s: &str) -> bool {
    let s = s.trim_start().get(..7).unwrap_or(s).to_ascii_lowercase();
    s.starts_with("wstree1") || s.starts_with("wskey1") || s.starts_with("wsdict1")
}

/// A `wsdict1…` string (a zstd dictionary that travels with the keys).
pub fn is_dict_string(s: &str) -> bool {
    s.trim_start()
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("wsdict1"))
}

/// `--dict FILE`: zstd dictionaries for codec 3, each a file holding either the raw
/// dictionary (as `whispeer dict train` writes it) or its `wsdict1…` string.
#[derive(Debug, Args, Clone, Default)]
pub struct DictArgs {
    /// A zstd dictionary file (raw, from `whispeer dict train`, or a `wsdict1…` string);
    /// repeatable. Key files may also hold `wsdict1…` lines.
    #[arg(long = "dict", value_name = "FILE")]
    pub dicts: Vec<PathBuf>,
}

impl DictArgs {
    /// The dictionaries named by `--dict`.
    pub fn load(&self) -> Result<Vec<Dictionary>> {
        self.dicts.iter().map(|p| read_dictionary(p)).collect()
    }
}

/// Reads a dictionary file: a `wsdict1…` string, or the raw dictionary bytes.
pub fn read_dictionary(path: &Path) -> Result<Dictionary> {
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_bounded(f, MAX_DICT_INPUT, &path.display().to_string(), &mut bytes)?;
    let text = std::str::from_utf8(&bytes).ok().map(str::trim);
    if !text.is_some_and(is_dict_string) {
        // Any file of the right size is a raw dictionary, and dictionaries travel in
        // invites: a key file named by mistake would hand its keys to the invitee. Binary
        // files are scanned too (a PEM key with a stray byte is still a key).
        let scanned = String::from_utf8_lossy(&bytes);
        if let Some(found) = secret_in(&scanned) {
            return Err(NotADictionary {
                path: path.to_owned(),
                found,
            }
            .into());
        }
    }
    match text {
        Some(t) if is_dict_string(t) => Dictionary::from_key_string(t),
        _ => Dictionary::new(bytes.to_vec()),
    }
    .with_context(|| format!("invalid dictionary in {}", path.display()))
}

/// A secret found where a dictionary was expected (`--dict FILE`): refused, because
/// dictionaries are shared with invitees.
#[derive(Debug)]
pub struct NotADictionary {
    /// The file named as a dictionary.
    pub path: PathBuf,
    /// What it holds.
    pub found: SecretKind,
}

impl std::fmt::Display for NotADictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} holds {}, not a dictionary: refusing to use it as one (dictionaries are \
             shared with invitees)",
            self.path.display(),
            self.found
        )
    }
}

impl std::error::Error for NotADictionary {}

/// The kinds of secret [`secret_in`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// `wstree1…`
    TreeKey,
    /// `wskey1…`
    Grant,
    /// `wssec1…`
    Identity,
    /// `wslocked1…`
    Locked,
    /// `wsinv1…`
    Invite,
    /// `wsp_acct_sk_…` (`whispeer auth-keygen`, `whispeer-relay account add`).
    AccountKey,
    /// `wsp_tok_…` (`whispeer-relay account add --token`).
    BearerToken,
    /// `-----BEGIN … PRIVATE KEY-----` (PKCS#8, RSA, EC, OpenSSH, PGP, …).
    PemPrivateKey,
    /// `-----BEGIN … NKEY SEED-----` (a NATS credentials file).
    NatsSeed,
}

impl std::fmt::Display for SecretKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretKind::TreeKey => "a tree key (wstree1…)",
            SecretKind::Grant => "a grant (wskey1…)",
            SecretKind::Identity => "an identity secret (wssec1…)",
            SecretKind::Locked => "a passphrase-locked secret (wslocked1…)",
            SecretKind::Invite => "an invite (wsinv1…)",
            SecretKind::AccountKey => "a relay account key (wsp_acct_sk_…)",
            SecretKind::BearerToken => "a relay bearer token (wsp_tok_…)",
            SecretKind::PemPrivateKey => "a PEM private key (-----BEGIN … PRIVATE KEY-----)",
            SecretKind::NatsSeed => "a NATS credentials seed (-----BEGIN … NKEY SEED-----)",
        })
    }
}

/// The first secret `text` holds anywhere (so leading whitespace, a BOM or comments do not
/// hide it), case-insensitively: a whispeer key string (tree key, grant, identity secret,
/// passphrase-locked key, invite), a relay account key or bearer token, a PEM private key
/// or a NATS seed.
pub fn secret_in(text: &str) -> Option<SecretKind> {
    use whispeer_protocol::text::hrp;
    let lower = text.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    let kinds = [
        (hrp::TREE, SecretKind::TreeKey),
        (hrp::GRANT, SecretKind::Grant),
        (hrp::SECRET, SecretKind::Identity),
        (hrp::LOCKED, SecretKind::Locked),
        (hrp::INVITE, SecretKind::Invite),
    ];
    if let Some((_, k)) = kinds.iter().find(|(h, _)| has(&format!("{h}1"))) {
        return Some(*k);
    }
    if has(&whispeer::ACCOUNT_KEY_PREFIX.to_ascii_lowercase()) {
        return Some(SecretKind::AccountKey);
    }
    // whispeer-relay's `accounts::TOKEN_PREFIX`.
    if has("wsp_tok_") {
        return Some(SecretKind::BearerToken);
    }
    // A PEM armour line `-----BEGIN <label>-----` whose label names a private key or seed.
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("-----begin ") {
        rest = &rest[i + "-----begin ".len()..];
        let label = rest.split("-----").next().unwrap_or("");
        if label.len() <= 64 {
            // PKCS#8 (encrypted too), RSA, EC, DSA, OpenSSH, PGP ("… PRIVATE KEY BLOCK").
            if label.contains("private key") {
                return Some(SecretKind::PemPrivateKey);
            }
            if label.ends_with("nkey seed") {
                return Some(SecretKind::NatsSeed);
            }
        }
    }
    None
}

/// Key strings from a positional argument (`-` = stdin), else from the key flags and
/// environment, else from stdin when it is not a terminal.
pub fn key_texts_from(arg: Option<&str>, src: &KeyArgs) -> Result<Vec<String>> {
    match arg {
        Some("-") => read_stdin_keys(),
        Some(s) => {
            if looks_like_key(s) || s.trim_start().to_ascii_lowercase().starts_with("wssec1") {
                warn(
                    "a key given as an argument is visible to other users (ps, shell history); \
                     prefer --key-file FILE, WHISPEER_KEY or '-' for stdin",
                );
            }
            Ok(vec![s.trim().to_owned()])
        }
        None => {
            let t = src.texts()?;
            if !t.is_empty() {
                return Ok(t);
            }
            if !std::io::stdin().is_terminal() {
                let t = read_stdin_keys()?;
                if !t.is_empty() {
                    return Ok(t);
                }
            }
            usage!("no key given: pass KEY ('-' for stdin), --key-file FILE, or set {ENV_KEY}")
        }
    }
}

/// Exactly one key from a positional argument or the key sources, and the zstd
/// dictionaries (`wsdict1…` lines) next to it.
pub fn key_and_dictionaries(arg: Option<&str>, src: &KeyArgs) -> Result<(AnyKey, Vec<Dictionary>)> {
    let (dicts, keys): (Vec<String>, Vec<String>) = key_texts_from(arg, src)?
        .into_iter()
        .partition(|s| is_dict_string(s));
    if keys.len() != 1 {
        usage!("expected exactly one key, got {}", keys.len());
    }
    Ok((AnyKey::parse(&keys[0])?, parse_dictionaries(&dicts)?))
}

/// The zstd dictionaries (`wsdict1…` strings) among key strings.
pub fn parse_dictionaries(texts: &[String]) -> Result<Vec<Dictionary>> {
    texts
        .iter()
        .filter(|s| is_dict_string(s))
        .map(|s| Dictionary::from_key_string(s).context("invalid dictionary string"))
        .collect()
}

/// Exactly one key from a positional argument or the key sources (dictionaries among
/// them are ignored).
pub fn one_key(arg: Option<&str>, src: &KeyArgs) -> Result<AnyKey> {
    Ok(key_and_dictionaries(arg, src)?.0)
}

fn read_stdin_keys() -> Result<Vec<String>> {
    let mut b = zeroize::Zeroizing::new(Vec::new());
    read_bounded(std::io::stdin(), MAX_KEY_INPUT, "stdin", &mut b)?;
    let s = std::str::from_utf8(&b).context("stdin is not text (UTF-8): it holds no key string")?;
    Ok(split_keys(s))
}

/// `--identity`, falling back to `WHISPEER_IDENTITY`.
#[derive(Debug, Args, Clone, Default)]
pub struct IdentityArgs {
    /// Identity file written by `whispeer keygen --out` (else WHISPEER_IDENTITY: the secret
    /// string or a file path).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
}

impl IdentityArgs {
    /// The identity, if one is given.
    pub fn load(&self) -> Result<Option<Identity>> {
        let text = if let Some(p) = &self.identity {
            read_secret_file(p)?
        } else if let Some(text) = env_secret(ENV_IDENTITY, |s| {
            s.trim_start().to_ascii_lowercase().starts_with("wssec1")
        })? {
            text
        } else {
            return Ok(None);
        };
        let secret = split_keys(&text)
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("the identity file holds no secret"))?;
        Ok(Some(
            Identity::from_secret_string(&secret).context("invalid identity")?,
        ))
    }

    /// The identity; a usage error when none is given.
    pub fn require(&self) -> Result<Identity> {
        match self.load()? {
            Some(i) => Ok(i),
            None => {
                usage!("no identity given: use --identity FILE or set {ENV_IDENTITY}")
            }
        }
    }
}

/// The secret text environment variable `var` gives: its value when a line of it holds a
/// secret string (`is_secret`, `#` comment lines allowed: a key file's whole text pasted
/// in), else the text of the file it names; `None` when unset or blank. An error never
/// repeats the value: one that names no file may be a mangled secret (quotes kept by an env
/// file, a key string of another kind), and errors land in logs.
fn env_secret(var: &str, is_secret: impl Fn(&str) -> bool) -> Result<Option<String>> {
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    let v = v.to_string_lossy().into_owned();
    if v.trim().is_empty() {
        return Ok(None);
    }
    if split_keys(&v).iter().any(|s| is_secret(s)) {
        return Ok(Some(v));
    }
    let path = Path::new(v.trim());
    // Not only regular files: a FIFO (`<(cat key)`, `/dev/fd/N`) is read like one.
    if !path.exists() || path.is_dir() {
        anyhow::bail!(
            "{var} holds no key string of the kind expected here and names no file (its value \
             is not shown: it may be a secret)"
        );
    }
    read_secret_file(path)
        .with_context(|| format!("{var} names no readable file"))
        .map(Some)
}

/// Reads a file holding secrets (key, identity, relay account key): opened and read exactly
/// once (a FIFO such as `<(cat key)` works), its mode checked on the open file. A file that
/// group or others may write is refused, like ssh refuses such a private key: whoever can
/// rewrite it chooses the keys this program trusts. One others may read gets a warning.
pub fn read_secret_file(path: &Path) -> Result<String> {
    let bytes = read_secret_bytes(path)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a text file (UTF-8): it holds no key string",
            path.display()
        )
    })
}

/// [`read_secret_file`] as bytes.
pub fn read_secret_bytes(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    #[cfg(unix)]
    check_secret_mode(
        path,
        &f.metadata()
            .with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    read_bounded(
        &mut f,
        MAX_KEY_INPUT,
        &path.display().to_string(),
        &mut bytes,
    )?;
    Ok(bytes)
}

/// Refuses a secret file owned by another user, or one group or others may write; warns
/// when they may read it. Only regular files and FIFOs are checked: a terminal
/// (`/dev/stdin`) is no file anyone rewrites. Whoever can rewrite it chooses the keys this
/// program trusts — and its owner always can (chmod), so a file another local user planted
/// where `--key-file` or `WHISPEER_KEY` points (`/tmp/team.key`, mode 0600 or not) would have
/// this program seal with their key: refused unless it is ours or root's, as ssh does.
#[cfg(unix)]
fn check_secret_mode(path: &Path, m: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let kind = m.file_type();
    if !(kind.is_file() || kind.is_fifo()) {
        return Ok(());
    }
    let (owner, me) = (m.uid(), rustix::process::geteuid().as_raw());
    if owner != me && owner != 0 {
        anyhow::bail!(
            "{} holds secrets but belongs to another user (uid {owner}; this program runs as \
             uid {me}): refusing to read it — its owner chooses the keys it holds",
            path.display()
        );
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "{} holds secrets but is writable by group or others (mode {mode:03o}): refusing \
             to read it; fix it with `chmod 600 {}`",
            path.display(),
            shell_quoted(path)
        );
    }
    if mode & 0o077 != 0 {
        warn(format!(
            "{} holds secrets but is accessible by others (mode {mode:03o}); chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

/// A path as a shell word: as it is when only safe characters make it up, else quoted.
#[cfg(unix)]
fn shell_quoted(path: &Path) -> String {
    let s = path.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Writes a secret file with mode 0600. Without `force` an existing file is never touched;
/// with it the file is replaced atomically. See [`write_secret_bytes`].
pub fn write_secret_file(path: &Path, contents: &str, force: bool) -> Result<()> {
    write_secret_bytes(path, contents.as_bytes(), force)
}

/// Writes a secret file with mode 0600 so that a crash never leaves a half-written or a
/// missing file: the bytes go to a new temporary file beside it (created exclusively,
/// `O_EXCL`, with mode 0600), which is written and fsynced, then put in place — without
/// `force` by a hard link, which like `O_EXCL` fails when `path` exists (a file, a
/// directory or a symbolic link, even a dangling one: never followed), with `force` by a
/// rename over it — and the directory is fsynced. On a file system without hard links the
/// file is created at `path` exclusively and written there.
pub fn write_secret_bytes(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let refuse = || {
        anyhow::anyhow!(
            "refusing to overwrite {} (use --force to replace it)",
            path.display()
        )
    };
    if !force && path.symlink_metadata().is_ok() {
        return Err(refuse());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.{:08x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::RngCore::next_u32(&mut rand::rngs::OsRng)
    ));
    write_new(&tmp, bytes).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    if force {
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot replace {}", path.display()));
        }
    } else {
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(refuse()),
            // No hard links here (some network or FAT file systems): O_EXCL at `path`.
            Err(_) => {
                write_new(path, bytes).map_err(|e| match e.downcast_ref::<std::io::Error>() {
                    Some(io) if io.kind() == std::io::ErrorKind::AlreadyExists => refuse(),
                    _ => e,
                })?
            }
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Creates `path` exclusively (`O_EXCL`) with mode 0600, writes `bytes` and fsyncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| {
        let what = format!("cannot create {}", path.display());
        anyhow::Error::new(e).context(what)
    })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Fsyncs a directory, so a file just created or renamed in it survives a crash. Only
/// warns: the file itself is written and synced by then.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        warn(format!(
            "could not flush directory {} to disk: {e}",
            dir.display()
        ));
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Parses a tree id as `whispeer key show` prints it (32 hex digits), for `--tree`.
pub fn parse_tree_id(s: &str) -> Result<whispeer::protocol::TreeId, String> {
    let s = s.trim();
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a tree id is 32 hex digits (as `whispeer key show` prints it), got {s:?}"
        ));
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).map_err(|e| e.to_string())?;
    Ok(whispeer::protocol::TreeId(id))
}

/// `s` made safe to print for a person: every character [`is_terminal_hostile`] names is
/// written as a Rust-style escape (`\n`, `\r`, `\t`, else `\u{1b}`), and `\` as `\\` so an
/// escape in the output always stands for one character of the input. Tree names, scopes
/// and topic paths are chosen by whoever made the tree or sealed the invite (any UTF-8 but
/// NUL, `/`, `+` and `#` in a topic level), and a user decides whether to trust an invite
/// from the line showing them (review session 27, F7).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    escape_hostile(s, true)
}

/// A diagnostic (an `error:` or `warning:` line) made safe for the terminal: one line, every
/// character [`is_terminal_hostile`] names escaped as [`printable`] does, but `\` left as it
/// is, so a shell command or Windows path the message quotes can still be copied. An
/// escape in it can thus also be literal text; nothing anyone bases trust on is read from
/// these lines (review F4).
pub fn diagnostic(s: &str) -> std::borrow::Cow<'_, str> {
    escape_hostile(s, false)
}

/// `'s'` with [`printable`] and `'` escaped as `\'`, so the quoted text cannot appear to end
/// early and be followed by fields it made up.
pub fn quoted(s: &str) -> String {
    format!("'{}'", printable(s).replace('\'', "\\'"))
}

/// A JSON document with every [`is_terminal_hostile`] character written as a `\uXXXX` JSON
/// escape. `serde_json` escapes only C0 controls; DEL, C1 and the bidi characters would reach
/// the terminal raw. Outside strings JSON is ASCII, so this rewrites only string contents,
/// and a parser reads back exactly the original text.
pub fn json_printable(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.chars().any(is_terminal_hostile) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if is_terminal_hostile(c) {
            // Every such character is in the Basic Multilingual Plane: one \u escape.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: `wsdict1…` lines of a key file were added for every tree, so with
    /// key files of trees A and B (`sub --key-file a.key --key-file b.key`, each as
    /// `invite open --out` writes it) a member of tree A could name B's dictionary in a
    /// tree-A message and read it back out of B's dictionary (the cdb779b attack). Each
    /// file's dictionaries now serve its own keys' trees; a file of dictionaries only (and
    /// `--dict`) every tree.
    #[test]
    fn a_key_files_dictionaries_serve_its_own_trees() {
        use whispeer::protocol::seal::{Opener, Outgoing, SealOptions, Sealer};
        use whispeer::protocol::{Compression, MessageId, Topic};
        let (tree_a, tree_b) = (
            TreeKey::generate("team-a").unwrap(),
            TreeKey::generate("team-b").unwrap(),
        );
        let sample = b"{\"sensor\":\"kitchen\",\"celsius\":21.5}".repeat(20);
        let dict_a = Dictionary::new(b"tree A's dictionary ".repeat(40)).unwrap();
        let dict_b = Dictionary::new(sample.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, key: &str, d: &Dictionary| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("{key}\n{}\n", &*d.to_key_string())).unwrap();
            p
        };
        let args = KeyArgs {
            key_files: vec![
                file("a.key", &tree_a.grant_all().to_key_string(), &dict_a),
                file("b.key", &tree_b.grant_all().to_key_string(), &dict_b),
            ],
            ..KeyArgs::default()
        };
        let mut kr = keyring(&args.require().unwrap()).unwrap();
        args.add_dictionaries_to(&mut kr).unwrap();
        let (a, b) = (tree_a.tree_id(), tree_b.tree_id());
        assert!(kr.dictionary_for(a, &dict_a.id()).is_some());
        assert!(kr.dictionary_for(b, &dict_b.id()).is_some());
        assert!(kr.dictionary_for(a, &dict_b.id()).is_none());
        assert!(kr.dictionary_for(b, &dict_a.id()).is_none());

        // A member of tree A (holding B's dictionary some other way) seals a tree-A
        // message compressed with B's dictionary: it does not open.
        let mut mallorys = Keyring::new();
        mallorys.add_grant(tree_a.grant_all()).unwrap();
        mallorys.add_dictionary(dict_b.clone());
        let topic = Topic::new("home/kitchen").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let opts = |d: &Dictionary| SealOptions {
            compression: Compression::ZstdDict {
                level: 3,
                dict: d.id(),
            },
            ..SealOptions::default()
        };
        let msg = Outgoing {
            payload: &sample,
            content_type: "application/json",
            msg_id: MessageId([1; 16]),
            ts_ms: now,
        };
        let mut rng = rand_core::OsRng;
        let env = Sealer::new()
            .seal(
                &mallorys.topic_key(&topic).unwrap(),
                &msg,
                &opts(&dict_b),
                None,
                &mut rng,
            )
            .unwrap();
        let e = Opener::new().open(&kr, &env, now).unwrap_err();
        assert_eq!(e.missing_dictionary(), Some(dict_b.id()));
        // Tree B's own messages with it open.
        let env = Sealer::new()
            .seal(
                &kr.topic_key_in(b, &topic).unwrap(),
                &msg,
                &opts(&dict_b),
                None,
                &mut rng,
            )
            .unwrap();
        assert_eq!(Opener::new().open(&kr, &env, now).unwrap().payload, sample);

        // A file of dictionaries only serves every tree (as `--dict` does).
        let only = dir.path().join("dicts.key");
        std::fs::write(&only, format!("{}\n", &*dict_b.to_key_string())).unwrap();
        let args = KeyArgs {
            key_files: vec![only],
            ..KeyArgs::default()
        };
        let mut kr = Keyring::new();
        args.add_dictionaries_to(&mut kr).unwrap();
        assert!(kr.dictionary_for(a, &dict_b.id()).is_some());
    }

    #[test]
    fn printable_escapes_what_acts_on_a_terminal_and_nothing_else() {
        assert_eq!(printable("home/kitchen ünï"), "home/kitchen ünï");
        assert_eq!(
            printable("a\u{1b}[2Kb\r\nc\u{7f}\u{9b}\u{202e}\u{2066}\u{2069}\u{2028}\t\\"),
            "a\\u{1b}[2Kb\\r\\nc\\u{7f}\\u{9b}\\u{202e}\\u{2066}\\u{2069}\\u{2028}\\t\\\\"
        );
        // Zero-width joiners and other format characters that reorder nothing stay.
        assert_eq!(printable("a\u{200d}b"), "a\u{200d}b");
        assert_eq!(quoted("it's"), "'it\\'s'");
        // Bidi marks and interlinear annotation controls (review F8).
        assert_eq!(
            printable("a\u{200e}b\u{200f}c\u{61c}d\u{fff9}e\u{fffa}f\u{fffb}g"),
            "a\\u{200e}b\\u{200f}c\\u{61c}d\\u{fff9}e\\u{fffa}f\\u{fffb}g"
        );
        let json =
            serde_json::json!({ "t": "\u{200e}\u{200f}\u{61c}\u{fff9}\u{fffb}" }).to_string();
        let safe = json_printable(&json);
        assert!(!safe.chars().any(is_terminal_hostile), "{safe}");
        assert!(
            safe.contains("\\u061c") && safe.contains("\\ufffb"),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["t"], "\u{200e}\u{200f}\u{61c}\u{fff9}\u{fffb}");
        // Diagnostics: the same escapes, but a quoted shell word stays copyable.
        assert_eq!(
            diagnostic("chmod 600 'a'\\''b' \u{1b}]0;x\n"),
            "chmod 600 'a'\\''b' \\u{1b}]0;x\\n"
        );
        let json = serde_json::json!({ "t": "a\u{1b}\u{7f}\u{9b}\u{202e}" }).to_string();
        let safe = json_printable(&json);
        assert!(!safe.chars().any(is_terminal_hostile), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["t"], "a\u{1b}\u{7f}\u{9b}\u{202e}");
    }
}
