//! Log setup for the binary: `tracing-subscriber` with a `RUST_LOG`-style filter, as text
//! or JSON lines. The library only emits events and never puts envelope bytes in them.
//! Colour codes only when stderr is a terminal (a log file or pipe gets plain text). Key ids
//! are logged at `debug` and below only: `info` shows counts, connections and reasons.
//!
//! Connection lines (a client connected or disconnected, at `info`) are what a stranger
//! makes by connecting: for connections without a relay account, relay-wide, at most
//! [`CONN_LINES_PER_S`] a second (bursts of [`CONN_LINES_BURST`]) are written; the others
//! are counted and an `info` line says how many were left out ("N connection log lines
//! suppressed in the last T s", at most once every [`SUMMARY_EVERY`], with the lines' own
//! target [`CONN_LINES_TARGET`], so a filter keeping them keeps it). The lines of
//! connections signed in to a relay account are always written: only the operator's
//! account holders make them (at the per-address connect rate, like anyone), and a
//! stranger's flood cannot hide them. The metrics count every connection.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Connection log lines written per second at most, relay-wide, once a burst is spent.
pub const CONN_LINES_PER_S: u64 = 5;
/// Connection log lines that may be written at once after a quiet while.
pub const CONN_LINES_BURST: u64 = 50;
/// At most one "suppressed" summary line this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// The `tracing` target of the connection lines ([`crate::plugin::LoggingPlugin`]) and of
/// their "suppressed" summary.
pub const CONN_LINES_TARGET: &str = "whispeer_relay::plugin";

/// Nanoseconds since the first connection line of the process.
fn nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Never 0: 0 marks "no summary yet" in `LAST_SUMMARY` (it is the process's start).
    (start.elapsed().as_nanos() as u64).max(1)
}

/// The bucket as a generic cell rate algorithm: the time the bucket is next full again
/// ("theoretical arrival time", in [`nanos`]); one load and one compare-exchange a line.
static FULL_AT: AtomicU64 = AtomicU64::new(0);
/// Lines not written since the last summary.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
/// When the last summary was written ([`nanos`]; 0: none yet).
static LAST_SUMMARY: AtomicU64 = AtomicU64::new(0);

/// Whether a connection log line may be written now: `info` is enabled for
/// [`CONN_LINES_TARGET`] and the connection signed in to a relay account (`account`) or
/// the relay-wide bucket has room. A line left out is counted in the next summary.
pub(crate) fn conn_line(account: bool) -> bool {
    if !tracing::enabled!(target: CONN_LINES_TARGET, tracing::Level::INFO) {
        return false;
    }
    account || anonymous_line()
}

/// The bucket of the lines of connections without a relay account.
fn anonymous_line() -> bool {
    let now = nanos();
    let interval = 1_000_000_000 / CONN_LINES_PER_S;
    let mut full_at = FULL_AT.load(Ordering::Relaxed);
    let allowed = loop {
        let next = full_at.max(now) + interval;
        if next - now > CONN_LINES_BURST * interval {
            break false;
        }
        match FULL_AT.compare_exchange_weak(full_at, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break true,
            Err(seen) => full_at = seen,
        }
    };
    if !allowed {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
    summarize(now);
    allowed
}

/// Writes the summary of suppressed connection lines if there are any and the last one
/// is at least [`SUMMARY_EVERY`] old (called by [`conn_line`] and every second by the
/// thread [`init`] starts, so the count of a flood that stopped is written too).
fn summarize(now: u64) {
    let last = LAST_SUMMARY.load(Ordering::Relaxed);
    if now.saturating_sub(last) < SUMMARY_EVERY.as_nanos() as u64
        || SUPPRESSED.load(Ordering::Relaxed) == 0
        || LAST_SUMMARY
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let n = SUPPRESSED.swap(0, Ordering::Relaxed);
    let secs = (now - last).div_ceil(1_000_000_000);
    write_summary(n, secs);
}

/// The summary line: `n` connection lines left out in the last `secs` s.
pub(crate) fn write_summary(n: u64, secs: u64) {
    tracing::info!(
        target: CONN_LINES_TARGET,
        suppressed = n,
        "{n} connection log lines suppressed in the last {secs} s (at most {CONN_LINES_PER_S} \
         a second are written, bursts of {CONN_LINES_BURST}; the metrics count every connection)"
    );
}

/// Installs the global subscriber (logs go to stderr). Fails on an invalid filter.
/// Starts a thread that writes the summary of suppressed connection lines (see the
/// module docs) within a second of its being due.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("log-summary".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            summarize(nanos());
        })
        .map_err(|e| format!("cannot start the log summary thread: {e}"))?;
    Ok(())
}

/// What the text log format writes while `f` runs under a subscriber with `filter`
/// (`EnvFilter` syntax): what an operator's log file would hold. Tests only.
#[cfg(test)]
pub(crate) fn captured(filter: &str, f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buf = LogBuf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let log = buf.0.lock().unwrap().clone();
    String::from_utf8(log).unwrap()
}
