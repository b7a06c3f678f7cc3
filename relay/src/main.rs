//! `whispeer-relay`: `serve`, `generate-config`, `status`, `tls generate`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use whispeer_relay::config::{
    Config, ListenAddr, LogFormat, SlowConsumerPolicy, StoreKind, SyncMode,
};
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
    GenerateConfig,
    /// Print a summary of a running relay (from its admin port's /status).
    Status(StatusArgs),
    /// TLS helpers.
    #[command(subcommand)]
    Tls(TlsCommand),
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

/// Every flag overrides the config file; each also reads a `WHISPEER_*` variable.
#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (see `generate-config`).
    #[arg(long, env = "WHISPEER_CONFIG")]
    config: Option<PathBuf>,
    /// WebSocket listener, IP:PORT or "off".
    #[arg(long, env = "WHISPEER_WS")]
    ws: Option<ListenAddr>,
    /// Length-prefixed TCP listener, IP:PORT or "off".
    #[arg(long, env = "WHISPEER_TCP")]
    tcp: Option<ListenAddr>,
    /// WebSocket-over-TLS listener (needs --tls-cert/--tls-key).
    #[arg(long, env = "WHISPEER_WSS")]
    wss: Option<ListenAddr>,
    /// TCP-over-TLS listener (needs --tls-cert/--tls-key).
    #[arg(long, env = "WHISPEER_TLS")]
    tls: Option<ListenAddr>,
    /// Admin HTTP listener (/metrics, /status, /healthz).
    #[arg(long, env = "WHISPEER_ADMIN")]
    admin: Option<ListenAddr>,
    /// PEM certificate chain for wss/tls.
    #[arg(long, env = "WHISPEER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for wss/tls.
    #[arg(long, env = "WHISPEER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Largest frame in bytes.
    #[arg(long, env = "WHISPEER_MAX_FRAME")]
    max_frame: Option<usize>,
    /// Most concurrent connections.
    #[arg(long, env = "WHISPEER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most subscriptions per connection.
    #[arg(long, env = "WHISPEER_MAX_SUBSCRIPTIONS")]
    max_subscriptions: Option<usize>,
    /// Most levels in a filter (1..=32).
    #[arg(long, env = "WHISPEER_MAX_FILTER_DEPTH")]
    max_filter_depth: Option<usize>,
    /// Publishes per second per connection (0 = unlimited).
    #[arg(long, env = "WHISPEER_PUBLISH_RATE")]
    publish_rate: Option<u32>,
    /// Publish burst per connection.
    #[arg(long, env = "WHISPEER_PUBLISH_BURST")]
    publish_burst: Option<u32>,
    /// Most connections (handshakes included) from one source IP address.
    #[arg(long, env = "WHISPEER_MAX_CONNECTIONS_PER_ADDR")]
    max_connections_per_addr: Option<usize>,
    /// Sub/Unsub requests per second per connection (0 = unlimited).
    #[arg(long, env = "WHISPEER_SUB_RATE")]
    sub_rate: Option<u32>,
    /// Publishes per second shared by one source address (0 = unlimited).
    #[arg(long, env = "WHISPEER_ADDR_PUBLISH_RATE")]
    addr_publish_rate: Option<u32>,
    /// Sub/Unsub requests per second shared by one source address (0 = unlimited).
    #[arg(long, env = "WHISPEER_ADDR_SUB_RATE")]
    addr_sub_rate: Option<u32>,
    /// Ack frames per second per connection (0 = unlimited).
    #[arg(long, env = "WHISPEER_ACK_RATE")]
    ack_rate: Option<u32>,
    /// Outbound queue bound per connection, in bytes of queued messages.
    #[arg(long, env = "WHISPEER_QUEUE_MAX_BYTES")]
    queue_max_bytes: Option<usize>,
    /// Most bytes of unacknowledged envelopes per subscription.
    #[arg(long, env = "WHISPEER_MAX_UNACKED_BYTES")]
    max_unacked_bytes: Option<usize>,
    /// Outbound queue capacity per connection, in messages.
    #[arg(long, env = "WHISPEER_QUEUE_CAPACITY")]
    queue_capacity: Option<usize>,
    /// Slow-consumer policy: drop or disconnect.
    #[arg(long, env = "WHISPEER_SLOW_CONSUMER")]
    slow_consumer: Option<SlowConsumerPolicy>,
    /// Milliseconds to finish the handshake and send Hello.
    #[arg(long, env = "WHISPEER_HELLO_MS")]
    hello_ms: Option<u64>,
    /// Heartbeat interval announced to clients (and WebSocket ping interval).
    #[arg(long, env = "WHISPEER_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Idle timeout in milliseconds.
    #[arg(long, env = "WHISPEER_IDLE_MS")]
    idle_ms: Option<u64>,
    /// Drain deadline on shutdown, in milliseconds.
    #[arg(long, env = "WHISPEER_DRAIN_MS")]
    drain_ms: Option<u64>,
    /// Log filter (RUST_LOG syntax); RUST_LOG is used when this is not set.
    #[arg(long, env = "WHISPEER_LOG")]
    log: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "WHISPEER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Store: sqlite (durable file, default), memory, or none (live only).
    #[arg(long, env = "WHISPEER_STORE")]
    store: Option<StoreKind>,
    /// The SQLite store file.
    #[arg(long, env = "WHISPEER_STORE_PATH")]
    store_path: Option<PathBuf>,
    /// SQLite synchronous mode: full (fsync per commit) or normal.
    #[arg(long, env = "WHISPEER_STORE_SYNC")]
    store_sync: Option<SyncMode>,
    /// Messages queued for the store writer; beyond, publishes get Err(busy) (retryable).
    #[arg(long, env = "WHISPEER_STORE_QUEUE")]
    store_queue: Option<usize>,
    /// Most operations per store transaction.
    #[arg(long, env = "WHISPEER_STORE_MAX_BATCH")]
    store_max_batch: Option<usize>,
    /// Retention per token path: most messages (0 = unlimited).
    #[arg(long, env = "WHISPEER_RETENTION_MESSAGES")]
    retention_messages: Option<u64>,
    /// Retention per token path: most envelope bytes (0 = unlimited).
    #[arg(long, env = "WHISPEER_RETENTION_BYTES")]
    retention_bytes: Option<u64>,
    /// Retention per token path: oldest message in milliseconds (0 = unlimited).
    #[arg(long, env = "WHISPEER_RETENTION_AGE_MS")]
    retention_age_ms: Option<u64>,
    /// How long QoS 2 publish ids are remembered, in milliseconds.
    #[arg(long, env = "WHISPEER_DEDUP_WINDOW_MS")]
    dedup_window_ms: Option<u64>,
    /// Most publish ids remembered for dedup.
    #[arg(long, env = "WHISPEER_DEDUP_MAX")]
    dedup_max: Option<usize>,
    /// Unacknowledged QoS >= 1 deliveries are sent again after this many milliseconds.
    #[arg(long, env = "WHISPEER_ACK_TIMEOUT_MS")]
    ack_timeout_ms: Option<u64>,
    /// Most unacknowledged messages per subscription.
    #[arg(long, env = "WHISPEER_MAX_UNACKED")]
    max_unacked: Option<usize>,
    /// Once listening, write the bound addresses here as JSON.
    #[arg(long, env = "WHISPEER_READY_FILE")]
    ready_file: Option<PathBuf>,
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
}

impl ServeArgs {
    fn into_config(self) -> Result<(Config, Option<PathBuf>)> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::serve_default(),
        };
        // `serve` keeps messages in a durable SQLite file unless told otherwise.
        c.store.kind.get_or_insert(StoreKind::Sqlite);
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut c.listen.ws, self.ws);
        set(&mut c.listen.tcp, self.tcp);
        set(&mut c.listen.wss, self.wss);
        set(&mut c.listen.tls, self.tls);
        set(&mut c.listen.admin, self.admin);
        if self.tls_cert.is_some() {
            c.tls.cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls.key = self.tls_key;
        }
        set(&mut c.limits.max_frame, self.max_frame);
        set(&mut c.limits.max_connections, self.max_connections);
        set(&mut c.limits.max_subscriptions, self.max_subscriptions);
        set(&mut c.limits.max_filter_depth, self.max_filter_depth);
        set(&mut c.limits.publish_rate, self.publish_rate);
        set(&mut c.limits.publish_burst, self.publish_burst);
        set(
            &mut c.limits.max_connections_per_addr,
            self.max_connections_per_addr,
        );
        set(&mut c.limits.sub_rate, self.sub_rate);
        set(&mut c.limits.ack_rate, self.ack_rate);
        set(&mut c.limits.addr_publish_rate, self.addr_publish_rate);
        set(&mut c.limits.addr_sub_rate, self.addr_sub_rate);
        set(&mut c.queue.max_bytes, self.queue_max_bytes);
        set(&mut c.delivery.max_unacked_bytes, self.max_unacked_bytes);
        set(&mut c.queue.capacity, self.queue_capacity);
        set(&mut c.queue.slow_consumer, self.slow_consumer);
        set(&mut c.timeouts.hello_ms, self.hello_ms);
        set(&mut c.timeouts.heartbeat_ms, self.heartbeat_ms);
        set(&mut c.timeouts.idle_ms, self.idle_ms);
        set(&mut c.timeouts.drain_ms, self.drain_ms);
        let env_log = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
        if let Some(f) = self.log.or(env_log) {
            c.log.filter = f;
        }
        set(&mut c.log.format, self.log_format);
        if self.store.is_some() {
            c.store.kind = self.store;
        }
        set(&mut c.store.path, self.store_path);
        set(&mut c.store.sync, self.store_sync);
        set(&mut c.store.queue, self.store_queue);
        set(&mut c.store.max_batch, self.store_max_batch);
        set(&mut c.store.max_messages, self.retention_messages);
        set(&mut c.store.max_bytes, self.retention_bytes);
        set(&mut c.store.max_age_ms, self.retention_age_ms);
        set(&mut c.store.dedup_window_ms, self.dedup_window_ms);
        set(&mut c.store.dedup_max, self.dedup_max);
        set(&mut c.delivery.ack_timeout_ms, self.ack_timeout_ms);
        set(&mut c.delivery.max_unacked, self.max_unacked);
        c.validate()?;
        Ok((c, self.ready_file))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{}", Config::commented_toml());
            Ok(())
        }
        Command::Serve(args) => {
            let (config, ready_file) = args.into_config()?;
            logging::init(&config.log.filter, config.log.format).map_err(anyhow::Error::msg)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
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

async fn serve(config: Config, ready_file: Option<PathBuf>) -> Result<()> {
    // Install signal handlers before announcing readiness, so a signal sent right after
    // the ready file appears is never missed.
    let shutdown = shutdown_signal()?;
    let relay = Relay::bind(config).await?;
    let addrs = relay.addrs();
    tracing::info!(
        ws = ?addrs.ws, tcp = ?addrs.tcp, wss = ?addrs.wss, tls = ?addrs.tls, admin = ?addrs.admin,
        "whispeer-relay listening"
    );
    if let Some(path) = ready_file {
        write_atomically(&path, &serde_json::to_vec(&addrs)?)
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
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
    let body = admin::http_get(&args.admin, "/status").await?;
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
        "listeners    ws {}  tcp {}  wss {}  tls {}  admin {}",
        addr(s.listeners.ws),
        addr(s.listeners.tcp),
        addr(s.listeners.wss),
        addr(s.listeners.tls),
        addr(s.listeners.admin)
    );
    println!("connections  {} ({} sockets)", t.connections, s.sockets);
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
        "stored       {} messages  {} bytes  {} paths  {} retained  {} durables  {} dedup ids",
        st.messages, st.bytes, st.path_count, st.retained, st.durables, st.dedup_entries
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
