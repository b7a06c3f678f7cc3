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
//!
//! Failing accepts (`EMFILE` while the relay is out of file descriptors) are logged the
//! same way, per listener: the first at once, then one line every [`SUMMARY_EVERY`] at
//! most with the count of those left out, and one when accepts succeed again
//! ([`AcceptFailures`]).

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

/// Nanoseconds since the process's first connection line or failed accept.
fn nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Never 0: 0 marks "no summary yet" in `LAST_SUMMARY` (it is the process's start).
    (start.elapsed().as_nanos() as u64).max(1)
}

/// The bucket as a generic cell rate algorithm: the time the bucket is next full again
/// ("theoretical arrival time", in [`nanos`]); one load and one compare-exchange a line.
static FULL_AT: AtomicU64 = AtomicU64::new(0);
/// Lines not written since the last summary, and when that was written.
static SUPPRESSED: Summary = Summary::new();

/// Events left out of the log, and when the last line reporting them was written: the
/// summary half of a rate-limited log line, at most one every [`SUMMARY_EVERY`]. Lock-free
/// (the connection lines' is a static that every connection task updates).
struct Summary {
    /// Events left out since the last report.
    left_out: AtomicU64,
    /// When the last report was written ([`nanos`]; 0: none yet).
    last: AtomicU64,
}

impl Summary {
    const fn new() -> Self {
        Self {
            left_out: AtomicU64::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// One more event left out of the log.
    fn leave_out(&self) {
        self.left_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a report was written yet.
    fn reported(&self) -> bool {
        self.last.load(Ordering::Relaxed) != 0
    }

    /// A report written at `now` outside [`take_due`](Self::take_due) (the first line of
    /// its kind): the next is due [`SUMMARY_EVERY`] later.
    fn mark(&self, now: u64) {
        self.last.store(now, Ordering::Relaxed);
    }

    /// If a report is due at `now` — the last one at least [`SUMMARY_EVERY`] old (with none
    /// yet: `SUMMARY_EVERY` after [`nanos`] began) and at least `min` events left out
    /// since — claims it (of callers racing, one) and returns how many were left out and
    /// the seconds since the last report, rounded up.
    fn take_due(&self, now: u64, min: u64) -> Option<(u64, u64)> {
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SUMMARY_EVERY.as_nanos() as u64
            || self.left_out.load(Ordering::Relaxed) < min
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let n = self.left_out.swap(0, Ordering::Relaxed);
        Some((n, (now - last).div_ceil(1_000_000_000)))
    }
}

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
        SUPPRESSED.leave_out();
    }
    summarize(now);
    allowed
}

/// Writes the summary of suppressed connection lines if there are any and the last one
/// is at least [`SUMMARY_EVERY`] old (called by [`conn_line`] and every second by the
/// thread [`init`] starts, so the count of a flood that stopped is written too).
fn summarize(now: u64) {
    if let Some((n, secs)) = SUPPRESSED.take_due(now, 1) {
        write_summary(n, secs);
    }
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

/// The `tracing` target of [`AcceptFailures`]' lines: the accept loops' module, where the
/// "accept failed" line was written before it was bounded (a filter naming it still works).
pub const ACCEPT_LINES_TARGET: &str = "whispeer_relay::relay";

/// The log of one listener's failing accepts — typically `EMFILE`, out of file
/// descriptors, which lasts as long as connections hold them, the accept loop retrying
/// every 50 ms: the first failure is warned about at once, then at most one line every
/// [`SUMMARY_EVERY`] ("accept failed (N more since the last report)", the failures left
/// out in between counted as the connection lines' [`Summary`] counts its lines), and one
/// `info` line once an accept succeeds again ("accepting again after N failures") if a
/// failure was warned about since the last such line — so a listener whose accepts
/// alternate between failing and succeeding writes two lines every `SUMMARY_EVERY` at most.
/// Before, every failure was a line: 20 a second per listener for as long as it lasted.
/// One per accept loop (a single task: no contention on its counters).
pub(crate) struct AcceptFailures {
    summary: Summary,
    /// Failures since the last "accepting again" line.
    failures: u64,
    /// Whether a failure was warned about since the last "accepting again" line.
    warned: bool,
}

impl AcceptFailures {
    pub(crate) const fn new() -> Self {
        Self {
            summary: Summary::new(),
            failures: 0,
            warned: false,
        }
    }

    /// An accept on `listener` failed with `error` (the OS's: no peer-chosen bytes).
    pub(crate) fn failed(&mut self, listener: &dyn std::fmt::Display, error: &std::io::Error) {
        let now = nanos();
        self.failures += 1;
        let more = if self.summary.reported() {
            self.summary.take_due(now, 0).map(|(n, _)| n)
        } else {
            self.summary.mark(now);
            Some(0)
        };
        match more {
            None => {
                self.summary.leave_out();
                return;
            }
            Some(0) => tracing::warn!(
                target: ACCEPT_LINES_TARGET,
                listener = %listener,
                error = %error,
                "accept failed"
            ),
            Some(n) => tracing::warn!(
                target: ACCEPT_LINES_TARGET,
                listener = %listener,
                error = %error,
                more = n,
                "accept failed ({n} more since the last report)"
            ),
        }
        self.warned = true;
    }

    /// An accept on `listener` succeeded.
    pub(crate) fn accepted(&mut self, listener: &dyn std::fmt::Display) {
        if !self.warned {
            return;
        }
        let n = self.failures;
        tracing::info!(
            target: ACCEPT_LINES_TARGET,
            listener = %listener,
            failures = n,
            "accepting again after {n} failures"
        );
        self.failures = 0;
        self.warned = false;
    }
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
