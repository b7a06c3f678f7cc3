//! `whispeer-relay`: `serve`, `generate-config`, `status`, `tls generate`, `account add|list|remove|rotate`, `claims list|release`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use whispeer_relay::accounts::{self, AccountEntry, AccountFile, Right};
use whispeer_relay::config::{AuthMode, Config, Overrides};
use whispeer_relay::{admin, logging, Relay};

#[derive(Debug, Parser)]
#[command(name = "whispeer-relay", version, about = "The blind whispeer relay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay.
    Serve(Box<ServeArgs>),
    /// Print a commented TOML configuration with every setting and its default.
    GenerateConfig(GenerateConfigArgs),
    /// Print a summary of a running relay (from its admin port's /status).
    Status(StatusArgs),
    /// TLS helpers.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Manage relay accounts (the account file; a running relay reloads it).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Key-id claims in the auth-state file (auth.state): list them, or release some with
    /// the relay stopped.
    #[command(subcommand)]
    Claims(ClaimsCmd),
}

#[derive(Debug, Subcommand)]
enum ClaimsCmd {
    /// List the claims the auth-state file holds: key id, group, the account that made it
    /// (by=account-id:ID as `account list` prints ids, by=account:NAME for a legacy entry,
    /// by=- when not recorded: a claim from before creators were, counted as the group's),
    /// last use written (or "unknown"), durables recorded under the key id. With a running
    /// relay: as far as it wrote them (its newest uses may be in memory only).
    List(ClaimsListArgs),
    /// Release claims of a group, so any group may claim those key ids again. The relay
    /// must be STOPPED (it holds the file's lock while it runs; this refuses then): it
    /// would neither see the release nor keep it. A running relay releases claims by
    /// itself when a group at auth.max_claims_per_group needs a new key id and one has
    /// been unused for auth.claim_idle_ms. Claims with a durable recorded under the key
    /// id are kept (delete the durable first). Messages stored under a released key id
    /// stay: the next group to claim it could read them (sealed envelopes).
    Release(ClaimsReleaseArgs),
}

#[derive(Debug, Args)]
struct ClaimsStateArg {
    /// The relay's auth-state file (auth.state; serve's default: the store path with
    /// ".auth" appended).
    #[arg(
        long,
        env = "WHISPEER_AUTH_STATE",
        value_name = "whispeer-relay.db.auth"
    )]
    state: PathBuf,
}

#[derive(Debug, Args)]
struct ClaimsListArgs {
    #[command(flatten)]
    state: ClaimsStateArg,
    /// Only this group's claims (as `account list` prints it: group=…).
    #[arg(long)]
    group: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["key_id", "idle_ms", "by", "all"])))]
struct ClaimsReleaseArgs {
    #[command(flatten)]
    state: ClaimsStateArg,
    /// The group whose claims to release (as `account list` prints it: group=…).
    #[arg(long)]
    group: String,
    /// This key id (32 hex characters); repeatable.
    #[arg(long = "key-id", value_name = "HEX")]
    key_id: Vec<String>,
    /// Every claim of the group whose last use the file holds is at least this many
    /// milliseconds ago (claims with no last use written are kept).
    #[arg(long, value_name = "MS")]
    idle_ms: Option<u64>,
    /// Every claim of the group this account made (as `claims list` prints it: by=…, e.g.
    /// the account a relay's refusal names as holding the most of the group's claims).
    #[arg(long, value_name = "ACCOUNT")]
    by: Option<String>,
    /// Every claim of the group — also those with messages stored under their key id
    /// (history, retained values), which the next group to claim it can then read
    /// (sealed envelopes): this looks at the auth-state file only, never the store. Needs
    /// --force.
    #[arg(long)]
    all: bool,
    /// With --all: release every claim of the group although the store is not looked at.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct GenerateConfigArgs {
    /// Print the settings as the Markdown table of relay/README.md instead.
    #[arg(long)]
    markdown: bool,
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Write a self-signed end-entity certificate and key (for --tls-cert/--tls-key) and
    /// print the certificate's SHA-256 fingerprint, which clients pin with --tls-pin.
    Generate(TlsGenerateArgs),
}

#[derive(Debug, Args)]
struct TlsGenerateArgs {
    /// Certificate file to write (PEM).
    #[arg(long, default_value = "relay.crt")]
    cert: PathBuf,
    /// Private key file to write (PKCS#8 PEM, mode 0600).
    #[arg(long, default_value = "relay.key")]
    key: PathBuf,
    /// DNS name or IP address the certificate is for; repeatable.
    #[arg(long = "name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    names: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum AccountCmd {
    /// Add an account: with --key-out FILE a fresh Ed25519 account key is written there (the
    /// file `whispeer --auth-key` reads); with --public-key HEX an existing key is used;
    /// otherwise (or with --token) a fresh bearer token is printed once. The entry gets a
    /// random id: its identity (claims of its default group, durables, store usage), so a
    /// name removed and added again is a new account that inherits nothing.
    Add(AccountAddArgs),
    /// List accounts (name, group, kind, rights, key, then id=… or "legacy"); never tokens.
    List(AccountFileArg),
    /// Remove an account; a running relay closes its connections at once. Its identity is
    /// gone for good: adding the name again makes a new one.
    Remove(AccountRemoveArgs),
    /// Replace an account's key and/or token, keeping its identity (id, group, rights,
    /// key-id claims, durables, store usage): --key-out FILE writes a fresh key, --public-key
    /// HEX uses an existing one, --token prints a fresh token. Connections that proved the
    /// replaced key or token are closed at the relay's next reload.
    Rotate(AccountRotateArgs),
}

#[derive(Debug, Args)]
struct AccountFileArg {
    /// The account file (the relay's auth.accounts).
    #[arg(
        long,
        env = "WHISPEER_ACCOUNTS",
        default_value = "whispeer-accounts.toml"
    )]
    file: PathBuf,
    /// The relay's configuration file: when its [cluster] has shared_accounts = true, the
    /// cluster's account list in JetStream is edited (with its NATS servers, credentials
    /// and TLS) instead of --file; every relay of the cluster follows it at once.
    #[arg(long, value_name = "relay.toml")]
    config: Option<PathBuf>,
}

/// Where an account command reads and writes the list.
enum ListAt {
    File(PathBuf),
    Cluster(Box<whispeer_relay::config::ClusterConfig>),
}

impl AccountFileArg {
    fn at(&self) -> Result<ListAt> {
        if let Some(path) = &self.config {
            let c = Config::from_file(path)
                .with_context(|| format!("reading the relay configuration {}", path.display()))?;
            if c.cluster.shared_accounts {
                c.validate()?;
                return Ok(ListAt::Cluster(Box::new(c.cluster)));
            }
        }
        Ok(ListAt::File(self.file.clone()))
    }
}

impl std::fmt::Display for ListAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListAt::File(p) => write!(f, "{}", p.display()),
            ListAt::Cluster(c) => write!(
                f,
                "the cluster's account list (stream {}_ACCOUNTS)",
                c.stream
            ),
        }
    }
}

impl ListAt {
    /// The list as it is now.
    fn read(&self) -> Result<AccountFile> {
        match self {
            ListAt::File(p) => Ok(AccountFile::load(p)?),
            ListAt::Cluster(c) => cluster_list(c, |_| Ok(false)),
        }
    }

    /// Applies `change` to the list and writes it (for the cluster: only if nobody wrote
    /// in between, else on the newer version, again). `change` returns whether to write.
    fn edit(&self, mut change: impl FnMut(&mut AccountFile) -> Result<bool>) -> Result<()> {
        match self {
            ListAt::File(p) => {
                let mut file = AccountFile::load(p)?;
                if change(&mut file)? {
                    file.save(p)?;
                }
                Ok(())
            }
            ListAt::Cluster(c) => cluster_list(c, change).map(|_| ()),
        }
    }
}

/// Reads the cluster's list, applies `change` and writes it back if it says so (retrying on
/// a concurrent writer); returns the list as written (or read).
fn cluster_list(
    cluster: &whispeer_relay::config::ClusterConfig,
    mut change: impl FnMut(&mut AccountFile) -> Result<bool>,
) -> Result<AccountFile> {
    use whispeer_relay::store::jetstream::accounts as list;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let client = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            whispeer_relay::cluster::connect_once(cluster),
        )
        .await
        .context("NATS did not answer within 10 s")??;
        let js = async_nats::jetstream::new(client);
        let stream = list::open(&js, cluster).await?;
        for _ in 0..16 {
            let (seq, mut file) = match list::latest(&stream, cluster).await? {
                Some((seq, text)) => (
                    seq,
                    AccountFile::parse(&text, Path::new("<the cluster's account list>"))?,
                ),
                None => (0, AccountFile::default()),
            };
            if !change(&mut file)? {
                return Ok(file);
            }
            if list::replace(&js, cluster, seq, file.to_toml()?).await? {
                return Ok(file);
            }
        }
        anyhow::bail!("the cluster's account list kept changing under this edit; run it again")
    })
}

#[derive(Debug, Args)]
struct AccountAddArgs {
    /// A unique name for the account.
    name: String,
    #[command(flatten)]
    file: AccountFileArg,
    /// The group whose key ids the account shares (default: a group of its own).
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    cred: CredentialArgs,
    /// Rights, comma separated: publish,subscribe,replay,retain,durable (default: all).
    #[arg(long, value_delimiter = ',')]
    rights: Option<Vec<Right>>,
    /// With --group G where G is retired (the group of a removed account without an id):
    /// take it back, and with it the key ids it claimed.
    #[arg(long, requires = "group")]
    adopt_retired_group: bool,
}

#[derive(Debug, Args)]
struct AccountRotateArgs {
    /// The account's name.
    name: String,
    #[command(flatten)]
    file: AccountFileArg,
    #[command(flatten)]
    cred: CredentialArgs,
}

/// The credentials `account add` gives an account and `account rotate` replaces.
#[derive(Debug, Args)]
struct CredentialArgs {
    /// Generate an Ed25519 account key and write its secret here (mode 0600); for
    /// `rotate`, it replaces the account's key.
    #[arg(long, value_name = "FILE", conflicts_with = "public_key")]
    key_out: Option<PathBuf>,
    /// Use this Ed25519 public key (64 hex characters); for `rotate`, it replaces the
    /// account's key.
    #[arg(long, value_name = "HEX")]
    public_key: Option<String>,
    /// Issue a bearer token, printed once (only its SHA-256 is stored): for `add`, also
    /// (or, without a key, only); for `rotate`, it replaces the account's token.
    #[arg(long)]
    token: bool,
    /// Replace an existing --key-out file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct AccountRemoveArgs {
    /// The account's name.
    name: String,
    #[command(flatten)]
    file: AccountFileArg,
}

/// Every setting is a flag and a `WHISPEER_*` variable too (see `generate-config`).
#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (see `generate-config`).
    #[arg(long, env = "WHISPEER_CONFIG")]
    config: Option<PathBuf>,
    /// Once listening, write the bound addresses here as JSON (written to a temporary file
    /// and renamed, so a reader never sees half of it); `-` prints them as one JSON line on
    /// stdout instead, for a supervisor that waits on the pipe.
    #[arg(long, env = "WHISPEER_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Print the effective configuration (defaults < file < env < flags) as TOML and exit
    /// (the admin token and the NATS password and token redacted).
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: Overrides,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Admin URL of the relay.
    #[arg(
        long,
        env = "WHISPEER_ADMIN_URL",
        default_value = "http://127.0.0.1:7482"
    )]
    admin: String,
    /// Print the raw /status JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Admin token: /status then includes per-path detail (key ids).
    #[arg(long, env = "WHISPEER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// mimalloc instead of glibc's malloc. Every routed message allocates its `Msg` frame
/// (~1.1 KiB for a 1 KiB payload: above glibc's per-thread cache, so each one walked
/// glibc's large bins, slower the more connections had fragmented the heap). Alternated
/// A/B (`LOAD_RELAY_BIN=… cargo bench -p whispeer-relay --bench load -- --only "1->1"`,
/// 3 rounds): 1→1 beside 10,000 idle TCP subscribers 295–322k → 410–450k deliveries/s
/// (relay CPU 4.15–4.65 → 2.85–3.15 µs each), 1→1 alone 377–445k → 407–529k; idle TCP
/// connection 14.1 → 14.1–15.4 KiB of RSS (relay/README.md "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig(a) => {
            if a.markdown {
                print!("{}", Config::settings_markdown());
            } else {
                print!("{}", Config::commented_toml());
            }
            Ok(())
        }
        Command::Serve(args) => {
            let config = Config::for_serve(args.config.as_deref(), &args.settings)?;
            let ready_file = args.ready_file;
            if args.print_config {
                let mut shown = config.clone();
                for t in [
                    &mut shown.auth.admin_token,
                    &mut shown.cluster.password,
                    &mut shown.cluster.token,
                ]
                .into_iter()
                .flatten()
                {
                    *t = format!("<redacted, {} characters>", t.len());
                }
                print!("{}", toml::to_string(&shown)?);
                return Ok(());
            }
            logging::init(&config.log.filter, config.log.format).map_err(anyhow::Error::msg)?;
            warn_open_relay(&config);
            warn_cluster_claims(&config);
            warn_short_marker_keep(&config);
            for w in config
                .reserve_warnings()
                .into_iter()
                .chain(config.durability_warnings())
                .chain(config.auth.claim_warnings())
                .chain(args.settings.secrets_on_command_line())
            {
                tracing::warn!("{w}");
            }
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if config.runtime.workers > 0 {
                rt.worker_threads(usize::from(config.runtime.workers));
            }
            rt.enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(serve(config, ready_file))
        }
        Command::Tls(TlsCommand::Generate(args)) => tls_generate(args),
        Command::Status(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(status(args)),
        Command::Account(cmd) => account(cmd),
        Command::Claims(cmd) => claims(cmd),
    }
}

fn claims(cmd: ClaimsCmd) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let used = |c: &accounts::ClaimInfo| match c.used {
        Some(t) => format!("used={}s-ago", now.saturating_sub(t) / 1000),
        None => "used=unknown".to_string(),
    };
    match cmd {
        ClaimsCmd::List(a) => {
            let all = accounts::list_claims(&a.state.state)?;
            for c in all
                .iter()
                .filter(|c| a.group.as_ref().is_none_or(|g| *g == c.group))
            {
                println!(
                    "{}\tgroup={}\tby={}\t{}\tdurables={}",
                    c.key_id,
                    c.group,
                    c.by.as_deref().unwrap_or("-"),
                    used(c),
                    c.durables
                );
            }
            Ok(())
        }
        ClaimsCmd::Release(a) => {
            let mut keys = Vec::new();
            for k in &a.key_id {
                let mut b = [0u8; 16];
                hex::decode_to_slice(k.trim(), &mut b)
                    .map_err(|_| anyhow::anyhow!("--key-id {k:?}: expected 32 hex characters"))?;
                keys.push(hex::encode(b));
            }
            if a.all && !a.force {
                anyhow::bail!(
                    "--all releases every claim of group {:?} without looking at the store: \
                     messages stored under those key ids (history, retained values) stay, \
                     readable by the next group to claim one. Add --force to do that, or \
                     pick claims with --key-id, --idle-ms or --by",
                    a.group
                );
            }
            if a.force && !a.all {
                anyhow::bail!("--force goes with --all only");
            }
            let r = accounts::release_claims(&a.state.state, &a.group, |c| {
                a.all
                    || keys.contains(&c.key_id)
                    || a.by.as_ref().is_some_and(|b| c.by.as_ref() == Some(b))
                    || a.idle_ms
                        .is_some_and(|ms| c.used.is_some_and(|t| now.saturating_sub(t) >= ms))
            })?;
            if r.group_claims == 0 {
                anyhow::bail!(
                    "no claim of group {:?} in {}: nothing released. Groups holding claims \
                     there: {} (as `account list` and `claims list` print them: group=…)",
                    a.group,
                    a.state.state.display(),
                    if r.groups.is_empty() {
                        "none".to_string()
                    } else {
                        r.groups.join(", ")
                    }
                );
            }
            for c in &r.released {
                println!("released\t{}\tgroup={}\t{}", c.key_id, c.group, used(c));
            }
            for c in &r.kept {
                eprintln!(
                    "kept {} (group {}): {} durable(s) recorded under it; delete them first",
                    c.key_id, c.group, c.durables
                );
            }
            let missing: Vec<&String> = keys
                .iter()
                .filter(|k| !r.released.iter().chain(&r.kept).any(|c| c.key_id == **k))
                .collect();
            for k in &missing {
                eprintln!(
                    "no claim of {k} by group {:?} in {}",
                    a.group,
                    a.state.state.display()
                );
            }
            eprintln!(
                "released {} claim(s) of group {:?} in {}",
                r.released.len(),
                a.group,
                a.state.state.display()
            );
            if !missing.is_empty() {
                anyhow::bail!("{} key id(s) not claimed by that group", missing.len());
            }
            Ok(())
        }
    }
}

fn account(cmd: AccountCmd) -> Result<()> {
    match cmd {
        AccountCmd::Add(a) => {
            let at = a.file.at()?;
            let mut entry = AccountEntry {
                name: a.name.clone(),
                id: Some(accounts::new_id().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?),
                group: a.group.clone(),
                key: None,
                token_sha256: None,
                rights: a.rights.clone().unwrap_or_else(|| Right::ALL.to_vec()),
            };
            let (key, secret_out) = new_key_arg(&a.cred)?;
            entry.key = key;
            let token = if a.cred.token || entry.key.is_none() {
                let (t, hash) = new_token_arg()?;
                entry.token_sha256 = Some(hash);
                Some(t)
            } else {
                None
            };
            let public = entry.key.clone();
            // Validate the whole list before anything is written; the secret key file is
            // written before the list names its public key.
            let mut staged = false;
            let mut first_id = false;
            let edited = at.edit(|file| {
                if file.account.iter().any(|e| e.name == a.name) {
                    anyhow::bail!("account {:?} already exists in {at}", a.name);
                }
                // Relays from before ids refuse a list with one (unknown field `id`).
                first_id = !file.account.is_empty() && file.account.iter().all(|e| e.id.is_none());
                if a.adopt_retired_group {
                    let g = a.group.as_deref().unwrap_or_default();
                    if !file.adopt_retired(g) {
                        anyhow::bail!("group {g:?} is not retired in {at}");
                    }
                }
                file.account.push(entry.clone());
                file.validate()?;
                stage_secret_once(secret_out.as_ref(), &mut staged)?;
                Ok(true)
            });
            finish_secret(secret_out.as_ref(), staged, edited)?;
            eprintln!("added account {:?} to {at}", a.name);
            if first_id {
                eprintln!(
                    "note: this list now holds an account id, which relays older than this \
                     version cannot read: such a relay keeps its previous list in force (and \
                     so ignores later removals and rotations) until it is restarted on this \
                     version. Upgrade and restart every relay that reads this list."
                );
            }
            if let Some(p) = public {
                println!("public key: {p}");
            }
            if let Some(t) = token {
                eprintln!("bearer token (shown once; the relay keeps only its SHA-256):");
                println!("{t}");
            }
            Ok(())
        }
        AccountCmd::List(f) => {
            let file = f.at()?.read()?;
            let mut legacy = Vec::new();
            for e in &file.account {
                let kind = match (&e.key, &e.token_sha256) {
                    (Some(_), Some(_)) => "key+token",
                    (Some(_), None) => "key",
                    _ => "token",
                };
                let rights: Vec<_> = e.rights.iter().map(|r| r.name()).collect();
                // The list was checked when read: an id parses.
                let id = e.id.as_deref().and_then(|i| accounts::parse_id(i).ok());
                let group = match (&e.group, id) {
                    (Some(g), _) => g.clone(),
                    (None, Some(id)) => accounts::id_group(&id),
                    (None, None) => e.name.clone(),
                };
                if id.is_none() {
                    legacy.push(e.name.as_str());
                }
                // New columns go last: scripts reading the first five keep working.
                println!(
                    "{}\tgroup={}\t{}\t{}\t{}\t{}",
                    e.name,
                    group,
                    kind,
                    rights.join(","),
                    e.key.as_deref().unwrap_or("-"),
                    id.map_or("legacy".to_string(), |id| format!("id={}", hex::encode(id)))
                );
            }
            if !legacy.is_empty() {
                eprintln!(
                    "{} legacy account(s) without an id: {}. Their identity is their name \
                     (store tenant, durable owner account:NAME, default group = the name), \
                     as before ids: their claims, durables and store usage stay theirs, but \
                     a name removed and added back by hand without an id, or an explicit \
                     group equal to the name, shares them. To migrate one: `account remove \
                     NAME` then `account add NAME …` — a fresh identity, which does NOT keep \
                     the old one's key-id claims, durables or store usage (that is the \
                     point; they stay with the old identity, unusable).",
                    legacy.len(),
                    legacy.join(", ")
                );
            }
            Ok(())
        }
        AccountCmd::Rotate(a) => {
            if a.cred.public_key.is_none() && a.cred.key_out.is_none() && !a.cred.token {
                anyhow::bail!(
                    "say what to replace: --key-out FILE, --public-key HEX and/or --token"
                );
            }
            let at = a.file.at()?;
            let (key, secret_out) = new_key_arg(&a.cred)?;
            let token = if a.cred.token {
                Some(new_token_arg()?)
            } else {
                None
            };
            let mut staged = false;
            let edited = at.edit(|file| {
                let Some(e) = file.account.iter_mut().find(|e| e.name == a.name) else {
                    anyhow::bail!("no account {:?} in {at}", a.name);
                };
                if key.is_some() {
                    e.key = key.clone();
                }
                if let Some((_, hash)) = &token {
                    e.token_sha256 = Some(hash.clone());
                }
                file.validate()?;
                stage_secret_once(secret_out.as_ref(), &mut staged)?;
                Ok(true)
            });
            finish_secret(secret_out.as_ref(), staged, edited)?;
            eprintln!(
                "rotated account {:?} in {at} (same identity); connections that proved the \
                 replaced credential are closed at the relay's next reload",
                a.name
            );
            if let Some(p) = key {
                println!("public key: {p}");
            }
            if let Some((t, _)) = token {
                eprintln!("bearer token (shown once; the relay keeps only its SHA-256):");
                println!("{t}");
            }
            Ok(())
        }
        AccountCmd::Remove(a) => {
            let at = a.file.at()?;
            let mut retired = None;
            at.edit(|file| {
                let Some(r) = file.remove(&a.name) else {
                    anyhow::bail!("no account {:?} in {at}", a.name);
                };
                retired = r;
                Ok(true)
            })?;
            if let Some(g) = retired {
                // A legacy entry's group is its name: its claims stay with that group.
                eprintln!(
                    "note: {:?} was a legacy entry (no id): the key ids it claimed stay with \
                     its group {g:?}, now retired — no account can be given that group \
                     (relays of this version refuse a list that does) unless `account add \
                     --group {g} --adopt-retired-group` takes those claims over on purpose",
                    a.name
                );
                // Review 27b, R6: like the first id, a new top-level field.
                eprintln!(
                    "note: relays older than this version cannot read a list with \
                     retired_groups: such a relay keeps its previous list in force (still \
                     admitting {:?}) until it is restarted on this version. Upgrade and \
                     restart every relay that reads this list.",
                    a.name
                );
            }
            match at {
                ListAt::File(_) => eprintln!(
                    "removed account {:?}; a running relay closes its connections at its next reload",
                    a.name
                ),
                ListAt::Cluster(_) => eprintln!(
                    "removed account {:?} from {at}; every relay closes its connections now",
                    a.name
                ),
            }
            Ok(())
        }
    }
}

/// A secret key file to write: its path and contents.
type SecretFile = (PathBuf, String);

/// The account key an `add` or `rotate` asks for: `--public-key HEX` (checked), or a fresh
/// key for `--key-out FILE` (its secret returned, to be written once the list checks);
/// neither: none.
fn new_key_arg(c: &CredentialArgs) -> Result<(Option<String>, Option<SecretFile>)> {
    if let Some(hex) = &c.public_key {
        accounts::parse_hex32(hex).map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
        return Ok((Some(hex.trim().to_ascii_lowercase()), None));
    }
    let Some(out) = &c.key_out else {
        return Ok((None, None));
    };
    if out.exists() && !c.force {
        anyhow::bail!("{} exists (use --force to replace it)", out.display());
    }
    let (secret, public) =
        accounts::new_key().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok((Some(public), Some((out.to_owned(), secret))))
}

/// A fresh bearer token and the SHA-256 hex the account file keeps.
fn new_token_arg() -> Result<(String, String)> {
    let t = accounts::new_token().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let hash = hex::encode(accounts::token_hash(t.as_bytes()));
    Ok((t, hash))
}

/// Where a new account key's secret waits (`FILE.new`) until the account list that names
/// its public key is saved.
fn staged_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// Writes a new account key's secret (`--key-out FILE`) to `FILE.new` the first time the
/// account list's edit closure runs (it may run again when the list changed meanwhile):
/// before the list names the public key, so a saved list never names a key whose secret
/// was not written. FILE itself — the key a client may be using — is replaced only by
/// [`finish_secret`], once the list is saved.
fn stage_secret_once(secret_out: Option<&SecretFile>, staged: &mut bool) -> Result<()> {
    if let (Some((out, secret)), false) = (secret_out, *staged) {
        let tmp = staged_path(out);
        // A leftover of an interrupted run (removing a symlink removes the link).
        let _ = std::fs::remove_file(&tmp);
        write_secret(&tmp, secret)
            .with_context(|| format!("writing the account key {}", tmp.display()))?;
        *staged = true;
    }
    Ok(())
}

/// After the account list's edit: moves a staged secret over FILE when the list was saved
/// (a rename: FILE becomes the new, mode 0600 file even when it was a symlink or had a
/// looser mode), or removes it when the edit failed — FILE then still holds the key the
/// list names.
fn finish_secret(secret_out: Option<&SecretFile>, staged: bool, edited: Result<()>) -> Result<()> {
    let Some((out, _)) = secret_out.filter(|_| staged) else {
        return edited;
    };
    let tmp = staged_path(out);
    if let Err(e) = edited {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).with_context(|| {
        format!(
            "the account list names the new key, but moving its secret {} to {} failed \
             (the secret is in the first file)",
            tmp.display(),
            out.display()
        )
    })?;
    eprintln!("wrote the account key to {}", out.display());
    Ok(())
}

/// Writes a new secret file with mode 0600 (never world-readable, also not briefly); fails
/// if `path` exists (a file, or a symlink that would redirect the write).
fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Warns loudly (a banner on stderr and a `warn` log line) when a cluster of relays with
/// their own stores requires accounts (review finding 19): key-id claims are then kept by
/// each relay (`Claim::NotShared`), so a group can claim at relay B a key id another group
/// holds at relay A, and with it subscribe at B to what is published on it at A (the
/// bridge forwards it) or publish into it (docs/DEPLOY.md §2.3); the JetStream store
/// shares claims across the cluster.
fn warn_cluster_claims(config: &Config) {
    use whispeer_relay::config::ClusterStore;
    if config.auth.mode == AuthMode::Required
        && !config.cluster.urls.is_empty()
        && config.cluster.store == ClusterStore::Local
    {
        let msg = "WARNING: auth is required in a cluster with local stores (cluster.store = \
                   \"local\"): key-id claims are kept per relay, not shared. An accounts \
                   group can claim at this relay a key id another group already holds at \
                   another relay of the cluster, then subscribe here and receive that \
                   group's traffic on it (forwarded between relays), or publish into it; \
                   claims separate groups only within one relay. Use cluster.store = \
                   \"jetstream\" (--cluster-store jetstream) to share claims across the \
                   cluster (docs/DEPLOY.md §2.3).";
        eprintln!("\n{}\n{msg}\n{}\n", "!".repeat(78), "!".repeat(78));
        tracing::warn!("{msg}");
    }
}

/// Warns when a JetStream store purges durable deletion markers after less than a minute
/// (review of session 26, finding 4): a relay whose read of the durable stream lags that
/// long (a reconnect, a stall) misses a deletion and keeps counting the durable; fine for
/// tests, not for a cluster.
fn warn_short_marker_keep(config: &Config) {
    use whispeer_relay::config::ClusterStore;
    let keep = config.store.durable_marker_keep_ms;
    if config.cluster.store == ClusterStore::Jetstream && keep < 60_000 {
        tracing::warn!(
            durable_marker_keep_ms = keep,
            "store.durable_marker_keep_ms is under a minute: a relay of the cluster whose \
             read of the durable stream lags longer (a NATS reconnect, a stall) misses the \
             deletion of a durable and keeps counting it against the durable quotas; the \
             shortest keep time of the cluster's relays applies to all of them"
        );
    }
}

/// Warns loudly when clients can reach the relay from other machines without accounts.
fn warn_open_relay(config: &Config) {
    if config.auth.mode == AuthMode::Required {
        return;
    }
    let l = &config.listen;
    let open: Vec<String> = [
        ("ws", l.ws),
        ("tcp", l.tcp),
        ("wss", l.wss),
        ("tls", l.tls),
        ("quic", l.quic),
    ]
    .into_iter()
    .filter_map(|(n, a)| {
        a.0.filter(|a| !a.ip().is_loopback())
            .map(|a| format!("{n} {a}"))
    })
    .collect();
    if !open.is_empty() {
        let msg = format!(
            "WARNING: auth is off and the relay listens beyond loopback ({}): anyone who can \
             reach it may publish, subscribe, replay and hold durables. Set auth = \"required\" \
             (--auth required, with accounts from `whispeer-relay account add`).",
            open.join(", ")
        );
        eprintln!("\n{}\n{msg}\n{}\n", "!".repeat(78), "!".repeat(78));
        tracing::warn!("{msg}");
    }
}

fn tls_generate(args: TlsGenerateArgs) -> Result<()> {
    use whispeer_relay::tls;
    let g = tls::generate(&args.names)?;
    for p in [&args.cert, &args.key] {
        if !args.force && p.exists() {
            return Err(tls::TlsError::Exists(p.clone()).into());
        }
    }
    tls::write_pem(&args.cert, &g.cert_pem, false, args.force)?;
    tls::write_pem(&args.key, &g.key_pem, true, args.force)?;
    let hex: String = g.sha256.iter().map(|b| format!("{b:02x}")).collect();
    println!("sha256:{hex}");
    eprintln!(
        "wrote {} (self-signed end-entity certificate for {}) and {} (private key)\n\
         serve:  whispeer-relay serve --wss 0.0.0.0:7443 --tls-cert {} --tls-key {}\n\
         client: whispeer sub --relay wss://HOST:7443 --tls-pin {hex} ...",
        args.cert.display(),
        args.names.join(", "),
        args.key.display(),
        args.cert.display(),
        args.key.display(),
    );
    Ok(())
}

/// Raises this process's open-file limit to its hard limit, as servers do: every
/// connection (and handshake) is a descriptor, and at the usual soft limit of 1,024 four
/// addresses at their default cap of 256 pushed `accept` into `EMFILE`, keeping every
/// other client out long before `limits.max_connections` (10,000). Warns when even the
/// hard limit is below what that setting needs.
fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    // No hard limit: as many as the kernel's default per-process maximum (fs.nr_open).
    let target = l.maximum.unwrap_or(1 << 20);
    let mut now = l.current.unwrap_or(u64::MAX);
    if now < target {
        let raised = Rlimit {
            current: Some(target),
            maximum: l.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => now = target,
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
    }
    // Client sockets: up to the connection ceiling (max_connections, the evicted
    // connections still closing and the refused ones being told why); the admin port's
    // connections (at most ADMIN_MAX_CONNECTIONS at once); besides them listeners, the
    // store, logs.
    let sockets = whispeer_relay::config::Limits::connection_ceiling(max_connections)
        .saturating_add(whispeer_relay::admin::ADMIN_MAX_CONNECTIONS);
    let needed = sockets as u64 + 64;
    if now < needed {
        tracing::warn!(
            open_files = now,
            max_connections,
            needed,
            "the open-file limit is below what limits.max_connections needs (its client \
             sockets, evicted handshakes still closing and refused connections being told \
             why included, the admin port's connections, and 64 more): accept fails \
             (EMFILE) before the connection cap; raise it (ulimit -n, systemd LimitNOFILE=) \
             or lower max_connections"
        );
    }
}

async fn serve(config: Config, ready_file: Option<PathBuf>) -> Result<()> {
    raise_open_file_limit(config.limits.max_connections);
    // Install signal handlers before announcing readiness, so a signal sent right after
    // the ready file appears is never missed.
    let mut shutdown = Box::pin(shutdown_signal()?);
    // Binding may wait (the JetStream store waits for JetStream): a signal meanwhile stops.
    let relay = tokio::select! {
        r = Relay::bind(config) => r?,
        _ = &mut shutdown => {
            tracing::info!("stopped before the relay was ready");
            return Ok(());
        }
    };
    let addrs = relay.addrs();
    match ready_file {
        Some(path) if path.as_os_str() == "-" => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &addrs)?;
            writeln!(out)
                .and_then(|()| out.flush())
                .context("writing the ready line to stdout")?;
        }
        Some(path) => write_atomically(&path, &serde_json::to_vec(&addrs)?)
            .with_context(|| format!("writing the ready file {}", path.display()))?,
        None => {}
    }
    // Logged after the ready file is in place, so a supervisor reading the log can read
    // the file as soon as it sees this line.
    tracing::info!(
        ws = ?addrs.ws, tcp = ?addrs.tcp, wss = ?addrs.wss, tls = ?addrs.tls, quic = ?addrs.quic,
        admin = ?addrs.admin,
        "whispeer-relay listening"
    );
    relay.run(shutdown).await?;
    Ok(())
}

/// Writes to a temporary file and renames it, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

async fn status(args: StatusArgs) -> Result<()> {
    let body = admin::http_get_auth(&args.admin, "/status", args.admin_token.as_deref()).await?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let s: admin::Status =
        serde_json::from_slice(&body).context("the /status answer is not a relay status")?;
    let t = &s.traffic;
    let addr = |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    println!(
        "{}  (up {:.0} s{})",
        s.relay,
        s.uptime_seconds,
        if s.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    println!(
        "listeners    ws {}  tcp {}  wss {}  tls {}  quic {}  admin {}",
        addr(s.listeners.ws),
        addr(s.listeners.tcp),
        addr(s.listeners.wss),
        addr(s.listeners.tls),
        addr(s.listeners.quic),
        addr(s.listeners.admin)
    );
    println!("connections  {} ({} sockets)", t.connections, s.sockets);
    if s.banned_addresses > 0 {
        println!(
            "banned       {} source address(es) (connection churn)",
            s.banned_addresses
        );
    }
    println!("subscriptions {}", t.subscriptions);
    println!(
        "messages     in {}  out {}  last seq {}",
        t.messages_in, t.messages_out, s.last_seq
    );
    println!("bytes        in {}  out {}", t.bytes_in, t.bytes_out);
    println!(
        "slow consumers  policy {}  queue {}  dropped {}  disconnected {}",
        s.slow_consumer, s.queue_capacity, t.dropped, t.slow_consumer_disconnects
    );
    println!("errors sent  {}", t.errors);
    println!("plugins      {}", s.plugins.join(", "));
    let st = &s.store;
    let lim = |v: u64| {
        if v == 0 {
            "unlimited".to_string()
        } else {
            v.to_string()
        }
    };
    println!(
        "store        {}{}  {} bytes on disk  last seq {} (committed {})",
        st.kind,
        st.file
            .as_deref()
            .map(|f| format!(" {f}"))
            .unwrap_or_default(),
        st.file_bytes,
        st.last_seq,
        st.committed_seq
    );
    println!(
        "retention    per path: messages {}  bytes {}  age ms {}",
        lim(st.retention.max_messages),
        lim(st.retention.max_bytes),
        lim(st.retention.max_age_ms)
    );
    println!(
        "stored       {} messages  {} bytes ({} as the quotas count them)  {} paths  {} retained  {} durables  {} dedup ids",
        st.messages, st.bytes, st.quota_bytes, st.path_count, st.retained, st.durables, st.dedup_entries
    );
    if !st.paths.is_empty() {
        println!(
            "  {:<66} {:>10} {:>12} {:>10} {:>10}",
            "path (hex)", "messages", "bytes", "first", "last"
        );
        for p in &st.paths {
            let shown = if p.path.len() > 66 {
                format!("{}…", &p.path[..65])
            } else {
                p.path.clone()
            };
            println!(
                "  {:<66} {:>10} {:>12} {:>10} {:>10}",
                shown, p.messages, p.bytes, p.first_seq, p.last_seq
            );
        }
    }
    Ok(())
}
