//! `whispeer` — the command-line client: identities, keys, invites, publish, subscribe and a
//! load generator. See the "CLI" section of the crate README for every command, the JSON
//! output shapes, the environment variables and the exit codes.
//!
//! Exit codes: 0 success, 1 runtime error (bad key, unreachable relay, timeout, …),
//! 2 usage error (bad flags, missing key or identity).
#![forbid(unsafe_code)]

mod bench;
mod dict;
mod floor;
mod io;
mod keys;
mod pubsub;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// End-to-end encrypted publish/subscribe: keys, invites, pub, sub and bench.
#[derive(Debug, Parser)]
#[command(name = "whispeer", version, about, long_about = None)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an identity (signing key + invite key); prints its public id.
    Keygen(keys::KeygenArgs),
    /// Print the public id and sender id of an identity.
    Id(keys::IdArgs),
    /// Create, derive and inspect tree keys and grants.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Seal a grant to someone's public id, or open an invite addressed to you.
    #[command(subcommand)]
    Invite(keys::InviteCommand),
    /// Train, show and export zstd dictionaries (shared like keys; `pub --dict FILE`).
    #[command(subcommand)]
    Dict(dict::DictCommand),
    /// Publish JSON values (an argument, or JSON lines from stdin).
    Pub(pubsub::PubArgs),
    /// Subscribe and print one JSON line per message.
    Sub(pubsub::SubArgs),
    /// Load generator: publishers, subscribers, throughput and end-to-end latency.
    Bench(bench::BenchArgs),
    /// Create a relay account key (for relays with auth = required): writes the secret to
    /// FILE (mode 0600, read by --auth-key) and prints the public key for the operator's
    /// `whispeer-relay account add NAME --public-key HEX`.
    AuthKeygen(AuthKeygenArgs),
}

#[derive(Debug, clap::Args)]
struct AuthKeygenArgs {
    /// Where to write the account key.
    #[arg(long, value_name = "FILE")]
    out: std::path::PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

fn auth_keygen(a: AuthKeygenArgs) -> anyhow::Result<ExitCode> {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    seed.fill(0);
    let secret = format!("{}{hex}\n", whispeer::ACCOUNT_KEY_PREFIX);
    let public = whispeer::RelayAuth::parse_key(&secret)?
        .public_key()
        .map(|p| p.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .unwrap_or_default();
    io::write_secret_file(&a.out, &secret, a.force)?;
    eprintln!("wrote {}", a.out.display());
    io::print_or_exit(&public)?;
    Ok(ExitCode::SUCCESS)
}

/// An error in how the command was invoked (exit code 2), as opposed to a runtime failure.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

/// Fails with a usage error (exit code 2).
#[macro_export]
macro_rules! usage {
    ($($t:tt)*) => { return Err(anyhow::Error::new($crate::UsageError(format!($($t)*)))) };
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// mimalloc instead of glibc's malloc: the CLI's publish/open path allocates per message
/// (frames, envelopes, payloads) across the runtime and worker threads; measured with
/// `whispeer bench` (TCP, 1 KiB, 100k messages, three alternated rounds) it cut the
/// clients' CPU per message by ~10 % (unsigned 20.2–21.1 → 18.2–19.2 µs, batch-signed
/// 31.3–32.4 → 27.4–28.6 µs). Applications using the library choose their own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let parsed = Cli::command().try_get_matches().and_then(|m| {
        Cli::from_arg_matches(&m)
            .map(|cli| (cli, m))
            .map_err(|e| e.format(&mut Cli::command()))
    });
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with exit 0; real usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    if auth_token_on_command_line(&matches) {
        io::warn(
            "--auth-token puts the relay token on the command line, where other users can see \
             it (ps, shell history); prefer WHISPEER_AUTH_TOKEN",
        );
    }
    let result = match cli.command {
        Command::Keygen(a) => keys::keygen(a),
        Command::Id(a) => keys::id(a),
        Command::Key(c) => keys::key(c),
        Command::Invite(c) => keys::invite(c),
        Command::Dict(c) => dict::dict(c),
        Command::Pub(a) => runtime().and_then(|rt| rt.block_on(pubsub::publish(a))),
        Command::Sub(a) => runtime().and_then(|rt| rt.block_on(pubsub::subscribe(a))),
        Command::Bench(a) => runtime().and_then(|rt| rt.block_on(bench::run(a))),
        Command::AuthKeygen(a) => auth_keygen(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole cause chain, newlines folded and every other control or
            // bidi character escaped. Errors carry text others chose (a grant's scope, a
            // relay's close message), which must not act on the terminal (review F4).
            let msg = one_line(&e);
            eprintln!("error: {}", io::diagnostic(&msg));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Whether the command's `--auth-token` came from the command line rather than from
/// `WHISPEER_AUTH_TOKEN`.
fn auth_token_on_command_line(m: &clap::ArgMatches) -> bool {
    const ID: &str = "auth_token";
    let Some((_, sub)) = m.subcommand() else {
        return false;
    };
    // Commands without the flag answer Err (unknown id) here.
    matches!(sub.try_get_raw(ID), Ok(Some(_)))
        && sub.value_source(ID) == Some(clap::parser::ValueSource::CommandLine)
}

/// The error and its causes on one line. A cause whose text the message already shows (an
/// error that names its source and keeps it as `source()`) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg.replace(['\n', '\r'], " ")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
