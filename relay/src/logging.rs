//! Log setup for the binary: `tracing-subscriber` with a `RUST_LOG`-style filter, as text
//! or JSON lines. The library only emits events and never puts envelope bytes in them.
//! Colour codes only when stderr is a terminal (a log file or pipe gets plain text). Key ids
//! are logged at `debug` and below only: `info` shows counts, connections and reasons.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber (logs go to stderr). Fails on an invalid filter.
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
    result.map_err(|e| e.to_string())
}
