//! `whispeer bench --sub-process`: the subscribers of a load in a process of their own.
//!
//! Issue 11's setup is three processes sharing the cores — publisher, relay, subscriber —
//! as a user's would be. The parent (the publishers) starts this binary again with the same
//! arguments plus the hidden `--subscriber-child MODE` (`wsp`, or `nats:SUBJECT` for the
//! `--nats` run). Secrets never travel on the child's command line, which every user of the
//! machine can read (`ps`): the parent drops `--key`, `--key-file`, `--auth-token` and
//! `--auth-key` from the arguments it passes on, and hands the child the key strings it read
//! (or generated) in `WHISPEER_KEY`, a bearer token in `WHISPEER_AUTH_TOKEN` and the text of
//! an account key file in `WHISPEER_BENCH_AUTH_KEY` (read only by a subscriber process) —
//! so each secret file is read once, by the parent. They talk in lines over the child's
//! stdin and stdout:
//!
//! | direction | line | meaning |
//! | --- | --- | --- |
//! | child → parent | `ready` | connected and subscribed |
//! | parent → child | `go RUN_ID BASE_UNIX_NS` | the run id to accept, and the run's start on the wall clock |
//! | child → parent | `p R0 R1 …` | messages each subscriber has received so far (the window's progress) |
//! | parent → child | `stop` (or end of input) | stop receiving and report |
//! | child → parent | `result JSON` | a [`ChildResult`] |
//!
//! One clock for latency: each process's monotonic `Instant` is aligned to the run's start
//! through the wall clock (`CLOCK_REALTIME`, the same in every process of one machine), read
//! right beside it on both sides: within a few µs.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

use super::{
    collect_subscribers, cpu_seconds, round3, BenchArgs, Latency, Shared, SubConn, SubTotals,
};
use crate::pubsub::{AuthSecret, ConnArgs};

/// The account key file's text, handed from the parent to its subscriber process.
const ENV_CHILD_AUTH_KEY: &str = "WHISPEER_BENCH_AUTH_KEY";
/// The bearer token variable `--auth-token` also reads.
const ENV_AUTH_TOKEN: &str = "WHISPEER_AUTH_TOKEN";
/// The account key file variable `--auth-key` also reads.
const ENV_AUTH_KEY: &str = "WHISPEER_AUTH_KEY";
/// Flags whose value is a secret or names a secret file: never passed on to the child.
const SECRET_FLAGS: [&str; 4] = ["--key", "--key-file", "--auth-token", "--auth-key"];

/// The secrets a subscriber process needs, handed over in its environment.
#[derive(Clone)]
pub(super) struct Secrets {
    /// Key strings, one per line.
    pub keys: zeroize::Zeroizing<String>,
    /// The relay account, if any.
    pub auth: Option<AuthSecret>,
}

/// The subscriber process's relay account: the account key its parent read
/// (`WHISPEER_BENCH_AUTH_KEY`), else the bearer token (`WHISPEER_AUTH_TOKEN`).
pub(super) fn parent_auth(conn: &ConnArgs) -> Result<Option<AuthSecret>> {
    match std::env::var(ENV_CHILD_AUTH_KEY) {
        Ok(text) if !text.trim().is_empty() => {
            Ok(Some(AuthSecret::Key(zeroize::Zeroizing::new(text))))
        }
        _ => conn.auth_secret(),
    }
}

/// The parent's arguments for the child: all but [`SECRET_FLAGS`] and their values (as
/// `--flag VALUE` or `--flag=VALUE`). A value equal to one of those flags cannot be another
/// option's separate argument: clap would read it as the flag.
fn child_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        let text = arg.to_string_lossy();
        if SECRET_FLAGS.contains(&text.as_ref()) {
            let _value = args.next();
            continue;
        }
        if SECRET_FLAGS
            .iter()
            .any(|f| text.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
        {
            continue;
        }
        out.push(arg);
    }
    out
}

/// What the subscriber process reports at the end of a run.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChildResult {
    pub latency: Latency,
    #[serde(flatten)]
    pub totals: SubTotals,
    /// CPU seconds the subscriber process used between `go` and `stop`.
    pub cpu_s: f64,
}

/// The wall clock now, in ns since the Unix epoch.
fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The parent's side: a subscriber process, connected and subscribed.
pub(super) struct ChildSubs {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl ChildSubs {
    /// Starts this binary as the subscriber process of the run (`mode`: `wsp` or
    /// `nats:SUBJECT`) and waits until it has subscribed. `secrets`: the keys and relay
    /// account, handed over in the child's environment (never its command line).
    pub async fn spawn(mode: String, secrets: Secrets) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::spawn_blocking(&mode, &secrets))
            .await
            .context("subscriber process start")?
    }

    fn spawn_blocking(mode: &str, secrets: &Secrets) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program to start again")?;
        let mut cmd = Command::new(exe);
        cmd.args(child_args(std::env::args_os().skip(1)))
            .args(["--subscriber-child", mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env(crate::io::ENV_KEY, secrets.keys.as_str())
            .env_remove(ENV_AUTH_TOKEN)
            .env_remove(ENV_AUTH_KEY)
            .env_remove(ENV_CHILD_AUTH_KEY);
        match &secrets.auth {
            Some(AuthSecret::Key(text)) => {
                cmd.env(ENV_CHILD_AUTH_KEY, text.as_str());
            }
            Some(AuthSecret::Token(t)) => {
                cmd.env(ENV_AUTH_TOKEN, t.as_str());
            }
            None => {}
        }
        let mut child = cmd.spawn().context("cannot start the subscriber process")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the subscriber process has no pipes");
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim_end() != "ready" {
            let status = child.wait()?;
            bail!("the subscriber process did not start ({status}; its errors are above)");
        }
        Ok(ChildSubs {
            child,
            stdin,
            stdout,
        })
    }

    /// Starts the run: the child accepts `shared.run_id` from now on; its progress lands in
    /// `shared.received` (and wakes `shared.progress`) as it reports it.
    pub fn start(mut self, shared: Arc<Shared>, base_unix_ns: u64) -> Result<ChildRun> {
        writeln!(self.stdin, "go {} {}", shared.run_id, base_unix_ns)?;
        self.stdin.flush()?;
        let (tx, rx) = oneshot::channel();
        let mut stdout = self.stdout;
        let reader = std::thread::Builder::new()
            .name("bench-sub-process".into())
            .spawn(move || {
                let mut line = String::new();
                loop {
                    line.clear();
                    match stdout.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let l = line.trim_end();
                    if let Some(counts) = l.strip_prefix("p ") {
                        for (r, v) in shared.received.iter().zip(counts.split(' ')) {
                            if let Ok(v) = v.parse() {
                                r.store(v, Ordering::Release);
                            }
                        }
                        shared.progress.notify_waiters();
                    } else if let Some(json) = l.strip_prefix("result ") {
                        let _ = tx.send(serde_json::from_str::<ChildResult>(json));
                        return;
                    }
                }
            })
            .context("cannot start a thread")?;
        Ok(ChildRun {
            child: self.child,
            stdin: self.stdin,
            result: rx,
            reader,
        })
    }
}

/// A running subscriber process.
pub(super) struct ChildRun {
    child: Child,
    stdin: ChildStdin,
    result: oneshot::Receiver<serde_json::Result<ChildResult>>,
    reader: std::thread::JoinHandle<()>,
}

impl ChildRun {
    /// Stops the subscribers and returns what they measured.
    pub async fn finish(mut self) -> Result<ChildResult> {
        // A child that already exited cannot read this; its result (or its absence) says why.
        let _ = writeln!(self.stdin, "stop").and_then(|()| self.stdin.flush());
        drop(self.stdin);
        let result = self.result.await;
        let mut child = self.child;
        let reader = self.reader;
        let status = tokio::task::spawn_blocking(move || {
            let _ = reader.join();
            child.wait()
        })
        .await??;
        match result {
            Ok(r) => r.context("the subscriber process reported nonsense"),
            Err(_) => bail!("the subscriber process ended without a result ({status})"),
        }
    }
}

/// The child's side (`--subscriber-child`): `subs` are connected and subscribed.
pub(super) async fn serve(a: &BenchArgs, subs: Vec<SubConn>) -> Result<()> {
    let mut out = tokio::io::stdout();
    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let go = input
        .next_line()
        .await?
        .context("the bench process went away")?;
    let mut f = go.split(' ');
    let (Some("go"), Some(run_id), Some(base_unix_ns)) = (f.next(), f.next(), f.next()) else {
        bail!("expected 'go RUN_ID BASE_UNIX_NS', got '{go}'");
    };
    let (run_id, base_unix_ns): (u64, u64) = (run_id.parse()?, base_unix_ns.parse()?);
    let base = aligned_base(Instant::now(), unix_ns(), base_unix_ns);
    let cpu0 = cpu_seconds(None);
    let shared = Shared::new(base, run_id, subs.len(), a.window());
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = shared.spawn_subscribers(subs, &stop_rx);

    // Progress to the parent whenever a subscriber signals it (and every 10 ms besides, so
    // the last few messages of a run are not held back by `notify_every`).
    let reporter = {
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            let mut last = Vec::new();
            loop {
                let notified = shared.progress.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let counts: Vec<u64> = shared
                    .received
                    .iter()
                    .map(|r| r.load(Ordering::Acquire))
                    .collect();
                if counts != last {
                    let line: Vec<String> = counts.iter().map(u64::to_string).collect();
                    let line = format!("p {}\n", line.join(" "));
                    if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                        return;
                    }
                    last = counts;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };

    // `stop`, or the parent's end: either ends the run.
    while let Some(l) = input.next_line().await? {
        if l.trim() == "stop" {
            break;
        }
    }
    let _ = stop_tx.send(true);
    let _ = reporter.await;
    let (hist, totals) = collect_subscribers(tasks).await?;
    let r = ChildResult {
        latency: Latency::of(&hist),
        totals,
        cpu_s: round3(cpu_seconds(None) - cpu0),
    };
    out.write_all(format!("result {}\n", serde_json::to_string(&r)?).as_bytes())
        .await?;
    out.flush().await?;
    Ok(())
}

/// This process's `Instant` at the run's start, from a reading of both clocks here (`now`,
/// `wall_ns`) and the run's start on the wall clock: now, less the wall time since the
/// start (now itself if the wall clock says the start is still ahead).
fn aligned_base(now: Instant, wall_ns: u64, base_unix_ns: u64) -> Instant {
    let since = Duration::from_nanos(wall_ns.saturating_sub(base_unix_ns));
    now.checked_sub(since).unwrap_or(now)
}

/// The parent's clock reading that `go` carries: the wall clock beside the run's `Instant`.
pub(super) fn base_now() -> (Instant, u64) {
    (Instant::now(), unix_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subscriber process measures latency from the parent's start: its base lies as
    /// far back as the wall clock says the start was.
    #[test]
    fn the_childs_clock_is_aligned_to_the_parents_start() {
        let now = Instant::now() + Duration::from_secs(10);
        let start = 1_700_000_000_000_000_000;
        let base = aligned_base(now, start + 1_500_000, start);
        assert_eq!(now - base, Duration::from_micros(1_500));
        // A start the wall clock puts ahead (stepped back meanwhile): no negative age.
        assert_eq!(aligned_base(now, start - 5, start), now);
    }
}
