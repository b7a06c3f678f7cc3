//! What the client logs during a test: a `tracing` subscriber writing plain lines (no
//! colours, times or targets) at WARN and above into a buffer the test reads back.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

/// Log output of a test's own subscriber ([`capture_warnings`]).
#[derive(Clone, Default)]
pub struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Forgets everything written so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// Captures this thread's WARN and ERROR lines until the guard drops. Only what runs on
/// this thread is seen: use it with a current-thread runtime (`#[tokio::test]`'s default).
pub fn capture_warnings() -> (LogBuf, tracing::subscriber::DefaultGuard) {
    let buf = LogBuf::default();
    let w = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_writer(move || w.clone())
        .finish();
    (buf, tracing::subscriber::set_default(subscriber))
}
