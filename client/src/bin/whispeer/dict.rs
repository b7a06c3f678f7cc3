//! `dict …`: train, inspect and export zstd dictionaries (codec 3, PROTOCOL.md §4.6.1).
//!
//! A dictionary is content (it is made of messages): it is written with mode 0600 and
//! shared like a key — as a `wsdict1…` string in a key file, never through the relay in the
//! clear.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use whispeer::protocol::dict::{MAX_DICT_LEN, MIN_DICT_LEN};
use whispeer::protocol::Dictionary;

use crate::io;
use crate::usage;

#[derive(Debug, Subcommand)]
pub enum DictCommand {
    /// Train a zstd dictionary from sample messages (JSON values, trained on as the CBOR
    /// `pub` sends; --raw for other payloads): writes it (raw bytes, mode 0600) to --out and
    /// prints its id. Publish with it: `whispeer pub --dict FILE …`; share it
    /// with subscribers as a key (`whispeer dict export FILE`).
    Train(TrainArgs),
    /// Print a dictionary's id, size and format (FILE: raw bytes or a wsdict1… string).
    Show {
        /// The dictionary file.
        file: PathBuf,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the dictionary as a wsdict1… string, to add to key files (it is secret like a
    /// key: whoever holds it learns what the training messages had in common).
    Export {
        /// The dictionary file (raw bytes or a wsdict1… string).
        file: PathBuf,
        /// Write the string to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing FILE.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Sample messages: a directory (each file in it is one sample), or a file (one
    /// sample, or one per line with --lines); repeatable.
    #[arg(long = "samples", value_name = "DIR|FILE", required = true, num_args = 1..)]
    samples: Vec<PathBuf>,
    /// Each line of a sample file is one sample (JSON lines).
    #[arg(long)]
    lines: bool,
    /// Train on the sample bytes as they are (payloads your application serializes itself).
    /// Without it each sample is a JSON value and is converted to CBOR exactly as
    /// `whispeer pub` (and the SDKs' typed publish) sends it, so the dictionary matches
    /// what the topic carries.
    #[arg(long)]
    raw: bool,
    /// Largest dictionary size in bytes (at most 114688 = 112 KiB).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    size: usize,
    /// Where to write the dictionary (raw bytes, mode 0600).
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing FILE.
    #[arg(long)]
    force: bool,
}

pub fn dict(c: DictCommand) -> Result<ExitCode> {
    match c {
        DictCommand::Train(a) => train(a),
        DictCommand::Show { file, json } => {
            let d = io::read_dictionary(&file)?;
            if json {
                io::print_or_exit(&describe(&d).to_string())?;
            } else {
                io::print_or_exit(&format!(
                    "zstd dictionary {} ({} bytes, {})",
                    d.id(),
                    d.len(),
                    format_name(&d)
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DictCommand::Export { file, out, force } => {
            let d = io::read_dictionary(&file)?;
            let s = d.to_key_string();
            match out {
                Some(p) => {
                    io::write_secret_file(&p, &format!("{}\n", s.as_str()), force)?;
                    eprintln!("wrote {}", p.display());
                }
                None => io::print_or_exit(&s)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `zstd format` (magic, entropy tables, content) or `raw content`.
pub fn format_name(d: &Dictionary) -> &'static str {
    if d.is_zstd_format() {
        "zstd format"
    } else {
        "raw content"
    }
}

/// A JSON description of a dictionary (`dict show --json`, `key show` of a `wsdict1…`):
/// id, size, format and the compression setting that names it — never its bytes.
pub fn describe(d: &Dictionary) -> serde_json::Value {
    json!({
        "id": d.id().to_string(),
        "bytes": d.len(),
        "zstd_format": d.is_zstd_format(),
        "format": format_name(d),
        "compress": format!("zstd-dict:{}", d.id()),
    })
}

fn read_samples(a: &TrainArgs) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let add_file = |p: &Path, out: &mut Vec<Vec<u8>>| -> Result<()> {
        let b = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        if a.lines {
            out.extend(
                b.split(|c| *c == b'\n')
                    .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            );
        } else if !b.is_empty() {
            out.push(b);
        }
        Ok(())
    };
    for p in &a.samples {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for f in files {
                add_file(&f, &mut out)?;
            }
        } else {
            add_file(p, &mut out)?;
        }
    }
    Ok(out)
}

fn train(a: TrainArgs) -> Result<ExitCode> {
    if !(256..=MAX_DICT_LEN).contains(&a.size) {
        usage!(
            "--size must be 256 to {MAX_DICT_LEN} bytes (112 KiB), got {}",
            a.size
        );
    }
    let mut samples = read_samples(&a)?;
    if !a.raw {
        for (i, s) in samples.iter_mut().enumerate() {
            let v: serde_json::Value = serde_json::from_slice(s).with_context(|| {
                format!(
                    "sample #{} is not JSON (pass --raw to train on bytes as they are)",
                    i + 1
                )
            })?;
            *s = whispeer::to_cbor(&v)?;
        }
    }
    if samples.len() < 8 {
        usage!(
            "{} samples is too few to train on: give at least 8 (hundreds are better; --lines \
             splits a JSON-lines file)",
            samples.len()
        );
    }
    let total: usize = samples.iter().map(Vec::len).sum();
    let bytes = zstd::dict::from_samples(&samples, a.size).map_err(|e| {
        anyhow::anyhow!(
            "zstd could not train a dictionary from {} samples ({total} bytes): {e} \
             (give more or larger samples, or a smaller --size)",
            samples.len()
        )
    })?;
    debug_assert!(bytes.len() >= MIN_DICT_LEN);
    let d = Dictionary::new(bytes).context("the trained dictionary")?;
    // Raw bytes, mode 0600: the dictionary is content. Created exclusively (never over an
    // existing file or through a symbolic link unless --force replaces it), synced.
    io::write_secret_bytes(&a.out, d.as_bytes(), a.force)?;
    eprintln!(
        "trained on {} samples ({total} bytes); wrote {} ({} bytes)",
        samples.len(),
        a.out.display(),
        d.len()
    );
    io::print_or_exit(&describe(&d).to_string())?;
    Ok(ExitCode::SUCCESS)
}
