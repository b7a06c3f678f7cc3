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
//! same way, per listener: the first of a burst at once, then one line every
//! [`SUMMARY_EVERY`] at most with the count of those left out, and one when accepts
//! succeed again ([`AcceptFailures`]; at most four lines every `SUMMARY_EVERY`).

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
/// The `tracing` target of the `trace` line [`AcceptFailures`] writes for every failed
/// accept ("accept failure N of this burst"): off unless a filter asks for it (a test
/// counts the failures with it; an operator may too).
pub const ACCEPT_FAILURE_TARGET: &str = "whispeer_relay::accept_failures";

/// The log of one listener's failing accepts — typically `EMFILE`, out of file
/// descriptors, which lasts as long as connections hold them, the accept loop retrying
/// every 50 ms. A burst of failures is warned about at its first failure, at once, then
/// at most one line every [`SUMMARY_EVERY`] ("accept failed (N more since the last
/// report)", the failures left out in between counted as the connection lines'
/// [`Summary`] counts its lines); once an accept succeeds, an `info` line ends it
/// ("accepting again after N failures", N the burst's failures) and the counts start over:
/// the next failure is a new burst, warned about at once. "Accepting again" lines are
/// written at most one every `SUMMARY_EVERY`: until then a burst stays open (its next
/// failures continue it, its line is written by the first accept after that), so a
/// listener whose accepts alternate between failing and succeeding — as they do at the
/// descriptor limit while connections come and go — writes at most four lines every
/// `SUMMARY_EVERY` (an "accepting again", the next burst's first warning, and two of its
/// reports at most). Before bab115d every failure was a line: 20 a second per listener
/// for as long as it lasted; until the review's fix a burst starting within `SUMMARY_EVERY`
/// of the last report was not warned about nor ended by a line, and its failures were
/// counted again in the next report. One per accept loop (a single task: no contention on
/// its counters).
pub(crate) struct AcceptFailures {
    /// The current burst's reports: when the last was written, the failures left out.
    summary: Summary,
    /// Failures of the current burst (0: none open).
    failures: u64,
    /// When the last "accepting again" line was written ([`nanos`]; 0: none yet).
    last_again: u64,
}

impl AcceptFailures {
    pub(crate) const fn new() -> Self {
        Self {
            summary: Summary::new(),
            failures: 0,
            last_again: 0,
        }
    }

    /// An accept on `listener` failed with `error` (the OS's: no peer-chosen bytes).
    pub(crate) fn failed(&mut self, listener: &dyn std::fmt::Display, error: &std::io::Error) {
        self.failed_at(nanos(), listener, error);
    }

    /// [`failed`](Self::failed) at `now` ([`nanos`]; never 0).
    fn failed_at(&mut self, now: u64, listener: &dyn std::fmt::Display, error: &std::io::Error) {
        self.failures += 1;
        let n = self.failures;
        tracing::trace!(
            target: ACCEPT_FAILURE_TARGET,
            listener = %listener,
            error = %error,
            failures = n,
            "accept failure {n} of this burst"
        );
        let more = if n == 1 {
            // A new burst: warned about at once.
            self.summary.mark(now);
            Some(0)
        } else {
            self.summary.take_due(now, 0).map(|(n, _)| n)
        };
        match more {
            None => self.summary.leave_out(),
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
    }

    /// An accept on `listener` succeeded.
    pub(crate) fn accepted(&mut self, listener: &dyn std::fmt::Display) {
        if self.failures == 0 {
            return;
        }
        self.accepted_at(nanos(), listener);
    }

    /// [`accepted`](Self::accepted) at `now` ([`nanos`]; never 0).
    fn accepted_at(&mut self, now: u64, listener: &dyn std::fmt::Display) {
        let n = self.failures;
        if n == 0
            || (self.last_again != 0
                && now.saturating_sub(self.last_again) < SUMMARY_EVERY.as_nanos() as u64)
        {
            return;
        }
        tracing::info!(
            target: ACCEPT_LINES_TARGET,
            listener = %listener,
            failures = n,
            "accepting again after {n} failures"
        );
        self.last_again = now;
        // The burst is over: the next failure is warned about at once, counted from 0.
        self.failures = 0;
        self.summary = Summary::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn emfile() -> std::io::Error {
        std::io::Error::from_raw_os_error(24)
    }

    /// The messages of `log`'s [`ACCEPT_LINES_TARGET`] lines, in order.
    fn accept_lines(log: &str) -> Vec<String> {
        let at = format!("{ACCEPT_LINES_TARGET}: ");
        log.lines()
            .filter_map(|l| l.split_once(at.as_str()))
            .map(|(_, m)| m.split(" listener=").next().unwrap_or(m).to_owned())
            .collect()
    }

    /// The "N" of every "accepting again after N failures" line.
    fn again_counts(lines: &[String]) -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("accepting again after "))
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    /// Review (bab115d): "accepting again" ended a burst without starting its report over,
    /// so a new burst within 10 s of the last report was not warned about (nor, being
    /// unwarned, ended by a line), and the next report counted the first burst's left-out
    /// failures again. Now a burst after "accepting again" is warned about at once and
    /// counted from 0.
    #[test]
    fn a_burst_after_accepting_again_is_warned_about_at_once_and_counted_afresh() {
        let t = 100 * S;
        let log = captured("info", || {
            let mut f = AcceptFailures::new();
            f.failed_at(t, &"tcp", &emfile());
            f.failed_at(t + S, &"tcp", &emfile()); // left out
            f.accepted_at(t + 2 * S, &"tcp");
            f.failed_at(t + 3 * S, &"tcp", &emfile()); // a new burst
            f.failed_at(t + 4 * S, &"tcp", &emfile()); // left out
            f.failed_at(t + 14 * S, &"tcp", &emfile());
            f.accepted_at(t + 15 * S, &"tcp");
        });
        assert_eq!(
            accept_lines(&log),
            [
                "accept failed",
                "accepting again after 2 failures",
                "accept failed",
                "accept failed (1 more since the last report)",
                "accepting again after 3 failures",
            ],
            "{log}"
        );
    }

    /// Accepts alternating between failing and succeeding (at the descriptor limit, while
    /// connections come and go): the lines stay bounded — at most four every
    /// `SUMMARY_EVERY` — and the "accepting again" lines with the burst left open count
    /// every failure once.
    #[test]
    fn alternating_failures_and_accepts_write_a_bounded_number_of_lines() {
        const ROUNDS: u64 = 3_000; // one failure and one accept every 10 ms: 30 s
        let t = 100 * S;
        let ms = S / 1000;
        let mut open = 0;
        let log = captured("info", || {
            let mut f = AcceptFailures::new();
            for i in 0..ROUNDS {
                f.failed_at(t + i * 10 * ms, &"tcp", &emfile());
                f.accepted_at(t + i * 10 * ms + 5 * ms, &"tcp");
            }
            open = f.failures;
        });
        let lines = accept_lines(&log);
        let windows = ROUNDS * 10 * ms / SUMMARY_EVERY.as_nanos() as u64;
        assert!(
            lines.len() as u64 <= 4 * (windows + 1),
            "{} lines in {windows} windows:\n{log}",
            lines.len()
        );
        assert_eq!(again_counts(&lines).iter().sum::<u64>() + open, ROUNDS);
    }
}
