//! `keygen`, `id`, `key …` and `invite …`: everything that works on keys without a relay.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use whispeer::protocol::{upgrade_key_string, Dictionary, Provenance, Upgraded};
use whispeer::{
    Grant, Identity, Invite, PassphraseParams, PublicId, Scope, SenderId, Topic, TreeKey,
};

use crate::io::{self, AnyKey, DictArgs, IdentityArgs, KeyArgs};
use crate::usage;

/// Environment variable read by `key from-passphrase`.
pub const ENV_PASSPHRASE: &str = "WHISPEER_PASSPHRASE";

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the identity here (mode 0600) and print its public id; without it the secret is
    /// printed on stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing file.
    #[arg(long, requires = "out")]
    force: bool,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    /// Print `{"public_id": …, "sender_id": …}`.
    #[arg(long)]
    json: bool,
}

/// Where a derived key goes: stdout by default.
#[derive(Debug, Args)]
pub struct OutArgs {
    /// Write the key string to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing FILE.
    #[arg(long, requires = "out")]
    force: bool,
}

impl OutArgs {
    fn emit(&self, secret: &str) -> Result<()> {
        match &self.out {
            Some(p) => {
                io::write_secret_file(p, &format!("{secret}\n"), self.force)?;
                eprintln!("wrote {}", p.display());
                Ok(())
            }
            None => io::print_or_exit(secret),
        }
    }
}

/// Which part of a tree a derived grant covers.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// A subtree: the grant covers PATH and everything below it (`PATH/#`).
    #[arg(long, value_name = "PATH")]
    path: Option<String>,
    /// Exactly one topic (a single-topic grant: nothing below it).
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
}

/// The same, optional (for invites).
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct NarrowArgs {
    /// Narrow the key to the subtree PATH/# before sealing it.
    #[arg(long, value_name = "PATH")]
    path: Option<String>,
    /// Narrow the key to exactly this topic before sealing it.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// A fresh random tree: prints its admin key (wstree1…), which can issue every grant.
    New {
        /// The tree's name (a label for people, up to 128 bytes).
        #[arg(long, value_name = "NAME")]
        tree: String,
        #[command(flatten)]
        out: OutArgs,
    },
    /// A narrower grant (wskey1…) from a tree key or grant: a subtree (--path) or one topic
    /// (--topic). From a tree key the grant is signed by the admin (receivers verify it);
    /// from a grant it is signed by your --identity as its narrower (receivers that cannot
    /// re-derive it treat it as delegated by you).
    Derive {
        /// The key to derive from ('-' reads stdin; default --key-file / WHISPEER_KEY / stdin).
        key: Option<String>,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        src: KeyArgs,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Convert key strings of format 1 to the current format. A tree key (wstree1…)
    /// converts fully; a format-1 grant (wskey1…) has no admin signature and cannot be
    /// converted: ask the admin for a new grant (`key derive` with the tree key, or an
    /// invite).
    Upgrade {
        /// The key string ('-' reads stdin; default --key-file / WHISPEER_KEY / stdin).
        key: Option<String>,
        #[command(flatten)]
        src: KeyArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// The next epoch of a tree (revoking anyone means rotating): prints the new tree key
    /// (wstree1…, fresh random root, same tree id and admin). Holders of the new epoch refuse
    /// messages of earlier epochs dated at or after --cutoff; re-share grants of the new
    /// epoch (`key derive`, invites) with those who remain.
    Rotate {
        /// The tree key to rotate ('-' reads stdin; default --key-file / WHISPEER_KEY / stdin).
        key: Option<String>,
        /// Unix milliseconds: earlier-epoch messages dated at or after it are refused (from
        /// history too). Default: now (the time of the removal).
        #[arg(long, value_name = "UNIX_MS")]
        cutoff: Option<u64>,
        /// Unix milliseconds: messages of the new epoch dated after it are refused (holders
        /// that never get the next epoch stop accepting new messages then). Default: no end.
        #[arg(long, value_name = "UNIX_MS")]
        not_after: Option<u64>,
        #[command(flatten)]
        src: KeyArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// The tree key every holder of NAME + passphrase derives alike (Argon2id). The
    /// passphrase is read from WHISPEER_PASSPHRASE or the first line of stdin.
    FromPassphrase {
        /// The tree's name (part of the salt: the same passphrase under another name gives
        /// another tree).
        #[arg(long, value_name = "NAME")]
        tree: String,
        /// An optional realm (e.g. your application or organisation) also salted in: the same
        /// name and passphrase in another realm give another tree.
        #[arg(long, value_name = "REALM", default_value = "")]
        realm: String,
        /// Argon2id memory in KiB (every holder must use the same parameters; PROTOCOL §5.9
        /// allows 262144 with 2 iterations, or 65536 with 3 for a version-1 tree).
        #[arg(long, default_value_t = PassphraseParams::default().m_kib, hide_short_help = true)]
        argon2_memory_kib: u32,
        /// Argon2id iterations.
        #[arg(long, default_value_t = PassphraseParams::default().t, hide_short_help = true)]
        argon2_iterations: u32,
        /// Argon2id lanes.
        #[arg(long, default_value_t = PassphraseParams::default().p, hide_short_help = true)]
        argon2_lanes: u32,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Describe a key string of any kind (tree key, grant, identity, public id, sender id,
    /// invite, zstd dictionary) without revealing secrets.
    Show {
        /// The string ('-' reads stdin; default --key-file / WHISPEER_KEY / stdin).
        key: Option<String>,
        /// One JSON object per key.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        src: KeyArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Seal a key to a recipient's public id (wsid1…): prints an invite (wsinv1…) that only
    /// they can open. Sealed from a tree key (wstree1…) it is signed by the tree's admin key,
    /// so the recipient sees that the admin enrolled them (no --identity needed; --as-me signs
    /// with your identity instead); sealed from a grant (wskey1…) it is signed by your
    /// identity, and the recipient is warned to confirm with the admin that the epoch is
    /// current. Safe to send over any channel. --dict files
    /// travel in it, and so do the zstd dictionaries (wsdict1…) among the key strings given
    /// unless --path/--topic narrows the grant: the keys do not record which topic uses
    /// which dictionary, so a narrowed invite carries them only with --with-dicts.
    Seal {
        /// The recipient's public id (wsid1…, as printed by their `whispeer keygen`).
        #[arg(long, value_name = "PUBLIC_ID")]
        to: String,
        /// The key to share ('-' reads stdin; default --key-file / WHISPEER_KEY / stdin).
        key: Option<String>,
        #[command(flatten)]
        narrow: NarrowArgs,
        /// Seconds until the invite can no longer be opened.
        #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600)]
        expires_in: u64,
        #[command(flatten)]
        dicts: DictArgs,
        /// Carry no dictionary, not even the wsdict1… lines among the keys.
        #[arg(long, conflicts_with = "dicts")]
        no_dicts: bool,
        /// Carry the wsdict1… lines among the keys even when --path/--topic narrows the
        /// grant (they may have been trained on topics outside it).
        #[arg(long, conflicts_with = "no_dicts")]
        with_dicts: bool,
        /// With a tree key, sign with your identity (--identity / WHISPEER_IDENTITY) instead
        /// of the tree's admin key: the recipient is then warned that a member, not the
        /// admin, enrolled them. A grant always signs with your identity.
        #[arg(long)]
        as_me: bool,
        // Your identity: signs an invite sealed from a grant (or with --as-me), and a grant
        // --path/--topic narrows records it; not read for a tree key's invite otherwise.
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        src: KeyArgs,
    },
    /// Open an invite addressed to your identity: prints the key string it carries, then
    /// the zstd dictionaries (wsdict1…) it carries, one per line — a key file.
    Open {
        /// The invite (wsinv1…; '-' or nothing reads stdin).
        invite: Option<String>,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

fn identity_file_text(id: &Identity) -> String {
    format!(
        "# whispeer identity: keep this file secret (mode 0600)\n\
         # public id (for invites): {}\n\
         # sender id (on messages): {}\n\
         {}\n",
        id.public_id(),
        id.sender_id(),
        &*id.to_secret_string()
    )
}

pub fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let id = Identity::generate();
    match &a.out {
        Some(path) => {
            io::write_secret_file(path, &identity_file_text(&id), a.force)?;
            eprintln!(
                "identity written to {} (mode 0600); sender id: {}",
                path.display(),
                id.sender_id()
            );
            io::print_or_exit(&id.public_id().to_string())?;
        }
        None => {
            io::warn(
                "printing the identity's secret key on stdout; use --out FILE to store it \
                 with mode 0600 instead",
            );
            eprintln!("public id: {}", id.public_id());
            eprintln!("sender id: {}", id.sender_id());
            io::print_or_exit(&id.to_secret_string())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn id(a: IdArgs) -> Result<ExitCode> {
    let id = a.identity.require()?;
    if a.json {
        io::print_or_exit(
            &json!({
                "public_id": id.public_id().to_string(),
                "sender_id": id.sender_id().to_string(),
            })
            .to_string(),
        )?;
    } else {
        io::print_or_exit(&format!("public id: {}", id.public_id()))?;
        io::print_or_exit(&format!("sender id: {}", id.sender_id()))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn key(c: KeyCommand) -> Result<ExitCode> {
    match c {
        KeyCommand::New { tree, out } => {
            let tk = TreeKey::generate(&tree)?;
            out.emit(&tk.to_key_string())?;
        }
        KeyCommand::Derive {
            key,
            scope,
            src,
            identity,
            out,
        } => {
            let k = io::one_key(key.as_deref(), &src)?;
            let by = match &k {
                AnyKey::Tree(_) => None,
                AnyKey::Grant(_) => Some(identity.load()?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "deriving from a grant records who narrowed it: give --identity FILE \
                         (or WHISPEER_IDENTITY); from the tree key (wstree1…) the grant is \
                         admin-signed instead"
                    )
                })?),
            };
            let g = narrow(
                &k,
                by.as_ref(),
                scope.path.as_deref(),
                scope.topic.as_deref(),
            )?;
            out.emit(&g.to_key_string())?;
        }
        KeyCommand::Upgrade { key, src, out } => {
            let texts = io::key_texts_from(key.as_deref(), &src)?;
            let mut lines = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                match upgrade_key_string(t).with_context(|| format!("key #{}", i + 1))? {
                    Upgraded::Tree(tk) => {
                        eprintln!(
                            "key #{}: tree {} (epoch {}) converted to format 2",
                            i + 1,
                            io::quoted(tk.name()),
                            tk.epoch()
                        );
                        lines.push(tk.to_key_string().to_string());
                    }
                    Upgraded::Current(s) => {
                        eprintln!("key #{}: already the current format", i + 1);
                        lines.push(s.to_string());
                    }
                    other => anyhow::bail!("key #{}: unexpected upgrade result {other:?}", i + 1),
                }
            }
            out.emit(&lines.join("\n"))?;
        }
        KeyCommand::Rotate {
            key,
            cutoff,
            not_after,
            src,
            out,
        } => {
            let AnyKey::Tree(tk) = io::one_key(key.as_deref(), &src)? else {
                usage!("key rotate needs the tree key (wstree1…): only the admin rotates");
            };
            let cutoff = cutoff.unwrap_or_else(whispeer::now_ms);
            if not_after.is_some_and(|na| na < cutoff) {
                usage!(
                    "--not-after ({}) is before --cutoff ({cutoff})",
                    not_after.unwrap_or(0)
                );
            }
            let next = tk
                .rotate(cutoff, &mut rand::rngs::OsRng)?
                .with_not_after(not_after)?;
            eprintln!(
                "tree {}: epoch {} → {} (earlier epochs refused from {cutoff}); share grants \
                 of the new epoch with those who remain",
                io::quoted(next.name()),
                tk.epoch(),
                next.epoch()
            );
            out.emit(&next.to_key_string())?;
        }
        KeyCommand::FromPassphrase {
            tree,
            realm,
            argon2_memory_kib,
            argon2_iterations,
            argon2_lanes,
            out,
        } => {
            let params = PassphraseParams {
                m_kib: argon2_memory_kib,
                t: argon2_iterations,
                p: argon2_lanes,
            };
            // Before the passphrase is read: nothing waits on stdin for a refused command.
            check_passphrase_params(params)?;
            let pass = read_passphrase()?;
            let tk = TreeKey::from_passphrase_in_realm(&tree, &realm, pass.as_bytes(), params)?;
            out.emit(&tk.to_key_string())?;
        }
        KeyCommand::Show { key, json, src } => {
            let texts = io::key_texts_from(key.as_deref(), &src)?;
            for (i, t) in texts.iter().enumerate() {
                let d = describe(t).with_context(|| format!("key #{}", i + 1))?;
                if json {
                    io::print_or_exit(&io::json_printable(&d.to_string()))?;
                } else {
                    if i > 0 {
                        io::print_or_exit("")?;
                    }
                    print_human(&d)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Narrows a key to `path/#` or to exactly `topic` (`#` or empty path: unchanged whole tree).
/// From a tree key the grant is admin-signed; from a grant it is signed by `by`.
fn narrow(
    k: &AnyKey,
    by: Option<&Identity>,
    path: Option<&str>,
    topic: Option<&str>,
) -> Result<Grant> {
    let g = k.grant();
    let (p, exact) = match (path, topic) {
        (Some(p), _) => (p.trim().trim_end_matches("/#").trim_end_matches('/'), false),
        (None, Some(t)) => (t.trim(), true),
        (None, None) => return Ok(g.clone()),
    };
    if !exact && (p.is_empty() || p == "#") {
        if *g.scope() == Scope::Tree {
            return Ok(g.clone());
        }
        anyhow::bail!(
            "'#' is outside the grant's scope {}",
            io::quoted(&g.scope().to_string())
        );
    }
    let t = Topic::new(p).with_context(|| format!("invalid path '{p}'"))?;
    let scope = if exact {
        Scope::Topic(t.clone())
    } else {
        Scope::Subtree(t.clone())
    };
    match (k, by) {
        (AnyKey::Tree(tk), _) => Ok(tk.grant(&scope)),
        (AnyKey::Grant(_), Some(by)) => Ok(g.narrow(&t, exact, by)?),
        (AnyKey::Grant(_), None) if *g.scope() == scope => Ok(g),
        (AnyKey::Grant(_), None) => {
            anyhow::bail!("narrowing a grant records who narrowed it: an identity is needed")
        }
    }
}

/// PROTOCOL §5.9 fixes a passphrase tree's Argon2id parameters — every member MUST use
/// them: m = 262144 KiB, t = 2, p = 1 (the default), or m = 65536 KiB, t = 3, p = 1 to
/// reproduce a version-1 tree. The library's check ([`PassphraseParams::check`], which
/// `TreeKey::from_passphrase_in_realm` applies too), run here before the passphrase is read:
/// anything else is a usage error naming the flags of the version-1 parameters.
fn check_passphrase_params(p: PassphraseParams) -> Result<()> {
    if let Err(e) = p.check() {
        let v1 = PassphraseParams::V1;
        usage!(
            "{e} (--argon2-memory-kib {} --argon2-iterations {})",
            v1.m_kib,
            v1.t
        )
    }
    Ok(())
}

fn read_passphrase() -> Result<String> {
    if let Some(p) = std::env::var_os(ENV_PASSPHRASE) {
        let p = p.to_string_lossy().into_owned();
        if !p.is_empty() {
            return Ok(p);
        }
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("passphrase (echoed; prefer piping it or {ENV_PASSPHRASE}): ");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the passphrase from stdin")?;
    let p = line.trim_end_matches(['\n', '\r']).to_owned();
    if p.is_empty() {
        usage!("no passphrase: set {ENV_PASSPHRASE} or write it on stdin");
    }
    Ok(p)
}

fn scope_kind(s: &Scope) -> &'static str {
    match s {
        Scope::Tree => "tree",
        Scope::Subtree(_) => "subtree",
        Scope::Topic(_) => "topic",
    }
}

/// A JSON description of any key string (never containing secret material).
fn describe(s: &str) -> Result<serde_json::Value> {
    let s = s.trim();
    let hrp = s
        .to_ascii_lowercase()
        .split_once('1')
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    Ok(match hrp.as_str() {
        "wstree" => {
            let tk = TreeKey::from_key_string(s).context("invalid tree key")?;
            let cert = tk.cert();
            json!({
                "kind": "tree",
                "tree": tk.name(),
                "tree_id": tk.tree_id().to_string(),
                "scope": "#",
                "scope_kind": "tree",
                "epoch": tk.epoch(),
                "key_id": cert.keys().key_id().to_string(),
                "admin": tk.admin().to_string(),
                "passphrase": tk.is_passphrase(),
                "prev_cutoff_ms": tk.prev_cutoff_ms(),
                "not_after_ms": tk.not_after_ms(),
                "provenance": "admin-signed",
            })
        }
        "wskey" => {
            let g = Grant::from_key_string(s).context("invalid grant key")?;
            let k = g.epoch_keys();
            json!({
                "kind": "grant",
                "tree": g.cert().tree_name(),
                "tree_id": k.tree_id().to_string(),
                "scope": g.scope().to_string(),
                "scope_kind": scope_kind(g.scope()),
                "epoch": k.epoch(),
                "key_id": k.key_id().to_string(),
                "admin": g.cert().admin().to_string(),
                "passphrase": g.cert().is_passphrase(),
                "prev_cutoff_ms": g.cert().prev_cutoff_ms(),
                "not_after_ms": g.cert().not_after_ms(),
                "provenance": provenance_text(&g.claimed_provenance()),
                "narrowed_from": g.narrowed_from().map(|s| s.to_string()),
            })
        }
        "wssec" => {
            let id = Identity::from_secret_string(s).context("invalid identity")?;
            json!({
                "kind": "identity",
                "public_id": id.public_id().to_string(),
                "sender_id": id.sender_id().to_string(),
            })
        }
        "wsid" => {
            let p = PublicId::from_str(s).context("invalid public id")?;
            json!({
                "kind": "public_id",
                "public_id": p.to_string(),
                "sender_id": p.sender_id().to_string(),
            })
        }
        "wspk" => {
            let p = SenderId::from_str(s).context("invalid sender id")?;
            json!({ "kind": "sender_id", "sender_id": p.to_string() })
        }
        "wsinv" => {
            // Only the recipient can open it; check the checksum at least.
            let b = whispeer::protocol::text::decode_invite(s).context("invalid invite")?;
            json!({
                "kind": "invite",
                "format": b.first(),
                "note": "sealed; open it with `whispeer invite open`",
            })
        }
        "wsdict" => {
            let d = Dictionary::from_key_string(s).context("invalid dictionary string")?;
            let mut v = crate::dict::describe(&d);
            v["kind"] = json!("dictionary");
            v
        }
        _ => anyhow::bail!(
            "not a whispeer key string (expected wstree1…, wskey1…, wssec1…, wsid1…, wspk1…, \
             wsinv1… or wsdict1…)"
        ),
    })
}

fn provenance_text(p: &Provenance) -> String {
    match p {
        Provenance::AdminSigned => "admin-signed".into(),
        Provenance::Delegated { by } => format!("narrowed by {by} (delegated)"),
        other => other.to_string(),
    }
}

fn print_human(d: &serde_json::Value) -> Result<()> {
    // Names and scopes come from whoever made the key: escaped, one field per line.
    let get = |k: &str| {
        d.get(k).map(|v| match v {
            serde_json::Value::String(s) => io::printable(s).into_owned(),
            other => io::json_printable(&other.to_string()).into_owned(),
        })
    };
    let kind = get("kind").unwrap_or_default();
    let title = match kind.as_str() {
        "tree" => "tree key (admin: can issue every grant)".to_owned(),
        "grant" => format!("grant ({})", get("scope_kind").unwrap_or_default()),
        "identity" => "identity (secret)".to_owned(),
        "public_id" => "public id".to_owned(),
        "sender_id" => "sender id".to_owned(),
        "invite" => "invite (sealed)".to_owned(),
        "dictionary" => "zstd dictionary (content: secret like a key)".to_owned(),
        k => k.to_owned(),
    };
    io::print_or_exit(&format!("kind:      {title}"))?;
    let rows = [
        ("tree", "tree:      "),
        ("tree_id", "tree id:   "),
        ("scope", "scope:     "),
        ("epoch", "epoch:     "),
        ("key_id", "key id:    "),
        ("admin", "admin:     "),
        ("provenance", "signed:    "),
        ("narrowed_from", "narrowed:  "),
        ("public_id", "public id: "),
        ("sender_id", "sender id: "),
        ("id", "id:        "),
        ("bytes", "size:      "),
        ("format", "format:    "),
        ("compress", "compress:  "),
        ("note", "note:      "),
    ];
    for (k, label) in rows {
        if let Some(v) = get(k) {
            let unit = if k == "bytes" { " bytes" } else { "" };
            io::print_or_exit(&format!("{label}{v}{unit}"))?;
        }
    }
    Ok(())
}

pub fn invite(c: InviteCommand) -> Result<ExitCode> {
    match c {
        InviteCommand::Seal {
            to,
            key,
            narrow: n,
            expires_in,
            dicts,
            no_dicts,
            with_dicts,
            as_me,
            identity,
            src,
        } => {
            let to = to.trim();
            if to.to_ascii_lowercase().starts_with("wspk1") {
                usage!(
                    "--to needs a public id (wsid1…, printed by `whispeer keygen`), not a \
                     sender id (wspk1…)"
                );
            }
            let recipient = PublicId::from_str(to).context("invalid --to public id")?;
            let (k, mut carried) = io::key_and_dictionaries(key.as_deref(), &src)?;
            // Who signs: the tree's admin key when the key holds it (the recipient then
            // knows the admin enrolled it, PROTOCOL §7, §10), unless --as-me; else you.
            let signer = match &k {
                AnyKey::Tree(tk) if !as_me => tk.admin_identity(),
                _ => identity.require()?,
            };
            let g = narrow(&k, Some(&signer), n.path.as_deref(), n.topic.as_deref())?;
            // The keys do not say which topics a wsdict1… line among them serves (a
            // dictionary is content: it reveals what its training messages had in common),
            // so a grant narrowed here leaves them behind unless asked; --dict files were
            // named for this invite and travel.
            if !no_dicts && !with_dicts && !carried.is_empty() && g.scope() != k.grant().scope() {
                io::warn(format!(
                    "the invite is narrowed to {} and the keys do not record which topics \
                     their {} serve: it carries none of them (--with-dicts carries them, \
                     --dict FILE one of them)",
                    io::quoted(&g.scope().to_string()),
                    dictionary_list(&carried)
                ));
                carried.clear();
            }
            carried.extend(dicts.load()?);
            if no_dicts {
                carried.clear();
            }
            let expiry = whispeer::now_ms().saturating_add(expires_in.saturating_mul(1000));
            let inv = Invite::seal_with_dictionaries(
                &g,
                &carried,
                &signer,
                &recipient,
                expiry,
                &mut rand::rngs::OsRng,
            )?;
            if !carried.is_empty() {
                eprintln!("the invite carries {}", dictionary_list(&carried));
            }
            let admin = g.cert().admin();
            if signer.sender_id() == admin {
                eprintln!(
                    "signed by the tree's admin key {admin}: the recipient sees that the admin \
                     enrolled them (--as-me: sign with your identity)"
                );
            } else {
                eprintln!(
                    "signed by your identity {} (not the tree's admin key {admin}): the \
                     recipient is told to confirm with the admin that epoch {} is current",
                    signer.sender_id(),
                    g.epoch_keys().epoch()
                );
            }
            io::print_or_exit(&inv)?;
        }
        InviteCommand::Open {
            invite,
            identity,
            out,
        } => {
            let text = match invite.as_deref() {
                Some("-") | None => {
                    let mut b = Vec::new();
                    io::read_bounded(std::io::stdin(), io::MAX_KEY_INPUT, "stdin", &mut b)?;
                    String::from_utf8(b).context("the invite on stdin is not text (UTF-8)")?
                }
                Some(s) => s.to_owned(),
            };
            let text = text.trim();
            if text.is_empty() {
                usage!("no invite given: pass INVITE or write it on stdin");
            }
            let me = identity.require()?;
            let inv = Invite::open(text, &me, whispeer::now_ms())?;
            eprintln!("{}", invite_line(&inv));
            if inv.inviter_is_admin() {
                // The signer's key is the certificate's admin key (PROTOCOL §7).
                let note = if inv.grant.cert().is_passphrase() {
                    " (a passphrase tree: everyone who knows the passphrase holds that key)"
                } else {
                    ""
                };
                eprintln!("the tree's admin key signed this invite: the admin enrolled you{note}");
            } else {
                let n = inv.grant.epoch_keys().epoch();
                eprintln!(
                    "warning: a member gave you epoch {n} of this tree; a member removed by a key \
                     rotation can still hand out the old epoch — confirm with the admin that {n} \
                     is current"
                );
            }
            let mut lines = vec![inv.grant.to_key_string().to_string()];
            if !inv.dictionaries.is_empty() {
                eprintln!("with {}", dictionary_list(&inv.dictionaries));
                lines.extend(
                    inv.dictionaries
                        .iter()
                        .map(|d| d.to_key_string().to_string()),
                );
            }
            out.emit(&lines.join("\n"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The one line the receiver of an invite decides on (PROTOCOL §7: "the receiver decides
/// whether it trusts the inviter; the grant's epoch certificate proves the tree"). The tree id
/// and the certificate's admin key identify the tree — its name is free text anyone can copy
/// — and the provenance says who vouches for the key. They come first; the scope and tree
/// name, chosen by whoever made the tree or sealed the invite, come last, quoted and escaped,
/// so they can neither rewrite the line nor pose as the fields before them.
fn invite_line(inv: &Invite) -> String {
    let g = &inv.grant;
    let cert = g.cert();
    let provenance = match (g.claimed_provenance(), g.narrowed_from()) {
        (Provenance::Delegated { by }, Some(from)) => {
            format!(
                "narrowed by {by} from {} (delegated)",
                io::quoted(&from.to_string())
            )
        }
        (p, _) => provenance_text(&p),
    };
    format!(
        "invite from {} for tree {} (admin: {}, epoch {}): {} in {}, {provenance}",
        inv.inviter,
        g.epoch_keys().tree_id(),
        cert.admin(),
        g.epoch_keys().epoch(),
        io::quoted(&g.scope().to_string()),
        io::quoted(cert.tree_name()),
    )
}

/// "2 zstd dictionaries: <id>, <id>" (what an invite carries).
fn dictionary_list(dicts: &[Dictionary]) -> String {
    let mut ids: Vec<String> = dicts.iter().map(|d| d.id().to_string()).collect();
    ids.sort();
    ids.dedup();
    let s = if ids.len() == 1 { "y" } else { "ies" };
    format!("{} zstd dictionar{s}: {}", ids.len(), ids.join(", "))
}
