//! The relay's settings through the real binary: `generate-config` parses back to the
//! defaults, and every old flag and `WHISPEER_*` variable still works, with the precedence
//! defaults < file < env < flags (`serve --print-config` prints what `serve` would use).

use std::path::Path;
use std::process::{Command, Output};

use whispeer_relay::config::{
    AuthMode, Config, ListenAddr, LogFormat, SlowConsumerPolicy, StoreKind, SyncMode,
};

fn relay(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"));
    cmd.args(args);
    // Only the variables a test sets count.
    for (k, _) in std::env::vars() {
        if k.starts_with("WHISPEER_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run whispeer-relay");
    assert!(
        out.status.success(),
        "whispeer-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn effective(args: &[&str], env: &[(&str, &str)]) -> Config {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let out = relay(&all, env);
    Config::from_toml(&String::from_utf8(out.stdout).unwrap()).expect("printed config parses")
}

#[test]
fn generated_config_parses_back_to_the_defaults() {
    let out = relay(&["generate-config"], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Config::from_toml(&text).unwrap(), Config::serve_default());
    // Every setting is explained with its flag and env var.
    assert!(text.contains("# flag --tenant-max-bytes, env WHISPEER_TENANT_MAX_BYTES"));
    assert!(text.contains("# flag --queue-max-bytes, env WHISPEER_QUEUE_MAX_BYTES"));
}

/// Every flag and environment variable the relay had before its settings were declared
/// once, with a distinct value each (checked by [`has_the_old_values`]).
const OLD_NAMES: &[(&str, &str, &str)] = &[
    ("--ws", "WHISPEER_WS", "127.0.0.1:1"),
    ("--tcp", "WHISPEER_TCP", "off"),
    ("--wss", "WHISPEER_WSS", "127.0.0.1:3"),
    ("--tls", "WHISPEER_TLS", "127.0.0.1:4"),
    ("--admin", "WHISPEER_ADMIN", "127.0.0.1:5"),
    ("--tls-cert", "WHISPEER_TLS_CERT", "c.pem"),
    ("--tls-key", "WHISPEER_TLS_KEY", "k.pem"),
    ("--max-frame", "WHISPEER_MAX_FRAME", "4096"),
    ("--max-connections", "WHISPEER_MAX_CONNECTIONS", "7"),
    ("--max-subscriptions", "WHISPEER_MAX_SUBSCRIPTIONS", "8"),
    ("--max-filter-depth", "WHISPEER_MAX_FILTER_DEPTH", "9"),
    ("--publish-rate", "WHISPEER_PUBLISH_RATE", "10"),
    ("--publish-burst", "WHISPEER_PUBLISH_BURST", "11"),
    (
        "--max-connections-per-addr",
        "WHISPEER_MAX_CONNECTIONS_PER_ADDR",
        "12",
    ),
    ("--sub-rate", "WHISPEER_SUB_RATE", "13"),
    ("--addr-publish-rate", "WHISPEER_ADDR_PUBLISH_RATE", "14"),
    ("--addr-sub-rate", "WHISPEER_ADDR_SUB_RATE", "15"),
    ("--ack-rate", "WHISPEER_ACK_RATE", "16"),
    ("--queue-max-bytes", "WHISPEER_QUEUE_MAX_BYTES", "17"),
    ("--max-unacked-bytes", "WHISPEER_MAX_UNACKED_BYTES", "18"),
    ("--queue-capacity", "WHISPEER_QUEUE_CAPACITY", "19"),
    ("--slow-consumer", "WHISPEER_SLOW_CONSUMER", "disconnect"),
    ("--hello-ms", "WHISPEER_HELLO_MS", "20"),
    ("--heartbeat-ms", "WHISPEER_HEARTBEAT_MS", "21"),
    ("--idle-ms", "WHISPEER_IDLE_MS", "22"),
    ("--drain-ms", "WHISPEER_DRAIN_MS", "23"),
    ("--log", "WHISPEER_LOG", "debug"),
    ("--log-format", "WHISPEER_LOG_FORMAT", "json"),
    ("--store", "WHISPEER_STORE", "memory"),
    ("--store-path", "WHISPEER_STORE_PATH", "x.db"),
    ("--store-sync", "WHISPEER_STORE_SYNC", "normal"),
    ("--store-queue", "WHISPEER_STORE_QUEUE", "24"),
    ("--store-max-batch", "WHISPEER_STORE_MAX_BATCH", "25"),
    ("--retention-messages", "WHISPEER_RETENTION_MESSAGES", "26"),
    ("--retention-bytes", "WHISPEER_RETENTION_BYTES", "27"),
    ("--retention-age-ms", "WHISPEER_RETENTION_AGE_MS", "28"),
    ("--dedup-window-ms", "WHISPEER_DEDUP_WINDOW_MS", "29"),
    ("--dedup-max", "WHISPEER_DEDUP_MAX", "30"),
    ("--ack-timeout-ms", "WHISPEER_ACK_TIMEOUT_MS", "31"),
    ("--max-unacked", "WHISPEER_MAX_UNACKED", "32"),
    ("--auth", "WHISPEER_AUTH", "required"),
    ("--accounts", "WHISPEER_ACCOUNTS", "a.toml"),
    ("--auth-state", "WHISPEER_AUTH_STATE", "s.auth"),
    ("--max-claims", "WHISPEER_MAX_CLAIMS", "33"),
    ("--accounts-reload-ms", "WHISPEER_ACCOUNTS_RELOAD_MS", "34"),
    (
        "--admin-token",
        "WHISPEER_ADMIN_TOKEN",
        "0123456789abcdef0123",
    ),
];

fn has_the_old_values(c: &Config) {
    let l = &c.limits;
    assert_eq!(c.listen.ws, "127.0.0.1:1".parse().unwrap());
    assert_eq!(c.listen.tcp, ListenAddr::OFF);
    assert_eq!(c.listen.wss, "127.0.0.1:3".parse().unwrap());
    assert_eq!(c.listen.tls, "127.0.0.1:4".parse().unwrap());
    assert_eq!(c.listen.admin, "127.0.0.1:5".parse().unwrap());
    assert_eq!(c.tls.cert.as_deref(), Some(Path::new("c.pem")));
    assert_eq!(c.tls.key.as_deref(), Some(Path::new("k.pem")));
    assert_eq!(
        (
            l.max_frame,
            l.max_connections,
            l.max_subscriptions,
            l.max_filter_depth
        ),
        (4096, 7, 8, 9)
    );
    assert_eq!(
        (l.publish_rate, l.publish_burst, l.max_connections_per_addr),
        (10, 11, 12)
    );
    assert_eq!(
        (l.sub_rate, l.addr_publish_rate, l.addr_sub_rate, l.ack_rate),
        (13, 14, 15, 16)
    );
    assert_eq!((c.queue.max_bytes, c.queue.capacity), (17, 19));
    assert_eq!(c.queue.slow_consumer, SlowConsumerPolicy::Disconnect);
    assert_eq!(c.delivery.max_unacked_bytes, 18);
    let t = &c.timeouts;
    assert_eq!(
        (t.hello_ms, t.heartbeat_ms, t.idle_ms, t.drain_ms),
        (20, 21, 22, 23)
    );
    assert_eq!(
        (c.log.filter.as_str(), c.log.format),
        ("debug", LogFormat::Json)
    );
    let st = &c.store;
    assert_eq!(
        (st.kind, st.sync),
        (Some(StoreKind::Memory), SyncMode::Normal)
    );
    assert_eq!(st.path, Path::new("x.db"));
    assert_eq!((st.queue, st.max_batch), (24, 25));
    assert_eq!((st.max_messages, st.max_bytes, st.max_age_ms), (26, 27, 28));
    assert_eq!((st.dedup_window_ms, st.dedup_max), (29, 30));
    assert_eq!(
        (c.delivery.ack_timeout_ms, c.delivery.max_unacked),
        (31, 32)
    );
    let a = &c.auth;
    assert_eq!(a.mode, AuthMode::Required);
    assert_eq!(a.accounts.as_deref(), Some(Path::new("a.toml")));
    assert_eq!(a.state.as_deref(), Some(Path::new("s.auth")));
    assert_eq!((a.max_claims_per_group, a.reload_ms), (33, 34));
    // Printed redacted: only its length shows.
    assert_eq!(a.admin_token.as_deref(), Some("<redacted, 20 characters>"));
}

#[test]
fn old_flag_names_still_work() {
    let args: Vec<&str> = OLD_NAMES.iter().flat_map(|(f, _, v)| [*f, *v]).collect();
    has_the_old_values(&effective(&args, &[]));
}

#[test]
fn old_environment_variables_still_work() {
    let env: Vec<(&str, &str)> = OLD_NAMES.iter().map(|(_, e, v)| (*e, *v)).collect();
    has_the_old_values(&effective(&[], &env));
}

#[test]
fn precedence_is_defaults_file_env_flags() {
    let dir = std::env::temp_dir().join(format!("wsp-config-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        "[limits]\npublish_rate = 5\nsub_rate = 6\nack_rate = 7\n\
         [store]\ntenant_max_paths = 8\nstore_qos0 = true\n[log]\nfilter = \"warn\"\n",
    )
    .unwrap();
    let env = [
        ("WHISPEER_CONFIG", file.to_str().unwrap()),
        ("WHISPEER_SUB_RATE", "60"),
        ("WHISPEER_ACK_RATE", "70"),
        ("WHISPEER_TENANT_MAX_PATHS", "80"),
    ];
    let c = effective(&["--ack-rate", "700"], &env);
    assert_eq!(c.limits.publish_rate, 5, "file over default");
    assert_eq!(c.limits.sub_rate, 60, "env over file");
    assert_eq!(c.limits.ack_rate, 700, "flag over env");
    assert_eq!(
        c.store.tenant_max_paths, 80,
        "quota settings have env vars now"
    );
    assert!(c.store.store_qos0, "an unset bool keeps the file's value");
    assert_eq!(c.limits.max_frame, Config::default().limits.max_frame);
    assert_eq!(c.log.filter, "warn");
    // RUST_LOG beats the file but not WHISPEER_LOG.
    let c = effective(
        &[],
        &[
            ("WHISPEER_CONFIG", file.to_str().unwrap()),
            ("RUST_LOG", "trace"),
        ],
    );
    assert_eq!(c.log.filter, "trace");
    let c = effective(&[], &[("RUST_LOG", "trace"), ("WHISPEER_LOG", "error")]);
    assert_eq!(c.log.filter, "error");
    // A bad value is refused with a message naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args(["serve", "--print-config"])
        .env("WHISPEER_MAX_FRAME", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-frame"));
    std::fs::remove_dir_all(&dir).unwrap();
}
