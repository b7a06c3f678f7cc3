//! The latency floor of this machine for `whispeer bench` at a paced rate: the same number
//! of socket hops as a run (publisher → relay → subscriber), over real loopback TCP, with
//! no whispeer in between — one thread writes timestamped payloads of the run's size at the
//! run's rate, one forwards them, one reads them. What it measures is what the kernel, the
//! scheduler and (in a VM) the hypervisor add to any two-hop message path here: on the
//! 2-vCPU CI machine kind its p99 swings from 0.25 to 1 ms and its max reaches 4–6 ms (the
//! 4 ms scheduler tick) with nothing else running. Printed beside the run's latency so a
//! tail can be told apart from the machine's own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// Messages sent for the floor: one second of the rate, 1,000–20,000.
pub(crate) fn messages(rate: f64) -> u64 {
    (rate as u64).clamp(1_000, 20_000)
}

/// Sends `n` payloads of `size` bytes at `rate`/s through a forwarding thread and records
/// their one-way latencies (µs, at least 1) into `hist`, which it returns.
pub(crate) fn measure(
    rate: f64,
    size: usize,
    n: u64,
    mut hist: Histogram<u64>,
) -> Result<Histogram<u64>> {
    let size = size.max(8);
    let last = TcpListener::bind("127.0.0.1:0").context("floor: bind")?;
    let middle = TcpListener::bind("127.0.0.1:0").context("floor: bind")?;
    let (last_addr, middle_addr) = (last.local_addr()?, middle.local_addr()?);
    let base = Instant::now();
    let receiver = thread::Builder::new().name("floor-recv".into()).spawn(
        move || -> Result<Histogram<u64>> {
            let (mut s, _) = last.accept()?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; size];
            for _ in 0..n {
                s.read_exact(&mut buf)?;
                let sent = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                let now = base.elapsed().as_nanos() as u64;
                hist.saturating_record((now.saturating_sub(sent) / 1000).max(1));
            }
            Ok(hist)
        },
    )?;
    let forwarder =
        thread::Builder::new()
            .name("floor-fwd".into())
            .spawn(move || -> Result<()> {
                let mut out = TcpStream::connect(last_addr)?;
                out.set_nodelay(true)?;
                let (mut s, _) = middle.accept()?;
                s.set_nodelay(true)?;
                let mut buf = vec![0u8; size];
                for _ in 0..n {
                    s.read_exact(&mut buf)?;
                    out.write_all(&buf)?;
                }
                Ok(())
            })?;
    let mut s = TcpStream::connect(middle_addr).context("floor: connect")?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate.max(1.0));
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        buf[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
        s.write_all(&buf).context("floor: write")?;
    }
    forwarder
        .join()
        .map_err(|_| anyhow::anyhow!("floor: the forwarding thread panicked"))??;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("floor: the reading thread panicked"))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_message_crosses_both_hops_and_is_timed() {
        let hist = hdrhistogram::Histogram::new(3).unwrap();
        let h = super::measure(20_000.0, 64, 500, hist).unwrap();
        assert_eq!(h.len(), 500);
        assert!(h.min() >= 1);
    }
}
