//! The `whispeer` CLI binary against the real `whispeer-relay` binary: keys, identities,
//! invites, `pub` | `sub` between processes over WebSocket and TCP, exit codes, bad input
//! and `bench`. Waiting is always on events (a `ready:` line, a printed message, process
//! exit); the generous bound in `support::TIMEOUT` only catches a hang.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use support::{start_relay_binary, RelayProcess, TIMEOUT};

fn whispeer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_whispeer"));
    for v in [
        "WHISPEER_KEY",
        "WHISPEER_IDENTITY",
        "WHISPEER_PASSPHRASE",
        "WHISPEER_RELAY",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs to completion with `stdin` as input.
fn run_with(args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Output {
    let mut child = whispeer()
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn whispeer");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let out = child.wait_with_output().expect("wait for whispeer");
    writer.join().unwrap();
    out
}

fn run(args: &[&str]) -> Output {
    run_with(args, "", &[])
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}
fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Succeeds and returns the trimmed stdout.
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "expected success, got {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o).trim().to_owned()
}

/// Fails with `code` and exactly one `error: …` line on stderr (warnings aside); returns it.
fn fails(o: Output, code: i32) -> String {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {err}",
        stdout(&o)
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected in: {err}");
    if code == 1 {
        let other: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("error: ") && !l.starts_with("warning: "))
            .collect();
        assert!(other.is_empty(), "only the error line expected: {err}");
    }
    errors[0].to_owned()
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn show(key: &str) -> serde_json::Value {
    let o = run_with(&["key", "show", "--json", "-"], key, &[]);
    serde_json::from_str(&ok(o)).unwrap()
}

/// A running `whispeer` process whose stdout and stderr lines arrive on channels.
struct Proc {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
    err_seen: Vec<String>,
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut child = whispeer()
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn whispeer");
        let out = lines_of(child.stdout.take().unwrap());
        let err = lines_of(child.stderr.take().unwrap());
        Proc {
            child,
            out,
            err,
            err_seen: Vec::new(),
        }
    }

    /// Waits for the `ready:` line on stderr.
    fn ready(&mut self) {
        loop {
            match self.err.recv_timeout(TIMEOUT) {
                Ok(l) if l.starts_with("ready:") => return,
                Ok(l) => self.err_seen.push(l),
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no ready line ({e:?}); stderr: {:?}", self.err_seen)
                }
            }
        }
    }

    /// Waits for a stderr line naming the zstd dictionary `id` it lacks (a subscriber
    /// without it logs that and delivers nothing), and returns it.
    fn missing_dictionary(&mut self, id: &str) -> String {
        let start = Instant::now();
        loop {
            let left = TIMEOUT.saturating_sub(start.elapsed());
            let line = self.err.recv_timeout(left).unwrap_or_else(|e| {
                let out: Vec<String> = self.out.try_iter().collect();
                panic!(
                    "no missing-dictionary warning ({e:?}): {:?}, stdout {out:?}",
                    self.err_seen
                )
            });
            if line.contains("dictionary") {
                assert!(line.contains(id), "{line}");
                return line;
            }
            self.err_seen.push(line);
        }
    }

    fn line(&mut self) -> String {
        match self.out.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.child.kill();
                panic!("no output line ({e:?}); stderr: {:?}", self.err_seen)
            }
        }
    }

    /// Waits for exit (EOF on both pipes first); returns status, rest of stdout, all stderr.
    fn finish(mut self) -> (ExitStatus, Vec<String>, Vec<String>) {
        let start = Instant::now();
        let mut rest = Vec::new();
        for (rx, sink) in [(&self.out, &mut rest), (&self.err, &mut self.err_seen)] {
            loop {
                let left = TIMEOUT.saturating_sub(start.elapsed());
                match rx.recv_timeout(left) {
                    Ok(l) => sink.push(l),
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = self.child.kill();
                        panic!("whispeer did not exit");
                    }
                }
            }
        }
        let status = self.child.wait().unwrap();
        (status, rest, std::mem::take(&mut self.err_seen))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An identity made with `keygen --out`: (file, public id, sender id).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String, String) {
    let f = dir.join(name);
    let public = ok(run(&["keygen", "--out", f.to_str().unwrap()]));
    let sender = public
        .parse::<whispeer::PublicId>()
        .expect("keygen prints a public id")
        .sender_id()
        .to_string();
    (f, public, sender)
}

/// A fresh tree key, written to a key file.
fn new_tree(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = ok(run(&["key", "new", "--tree", name]));
    (
        write_file(dir, &format!("{name}.key"), &format!("{key}\n")),
        key,
    )
}

/// `invite open --identity IDENTITY EXTRA…` of `inv` (on stdin), which succeeds: its
/// (trimmed stdout, stderr).
fn open_invite(identity: &Path, inv: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["invite", "open", "--identity", identity.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run_with(&args, inv, &[]);
    let err = stderr(&o);
    (ok(o), err)
}

/// `whispeer sub --relay URL FILTER --count N --key-file F…`, once it is ready.
fn sub_ready(url: &str, filter: &str, count: u32, key_files: &[&str]) -> Proc {
    let count = count.to_string();
    let mut args = vec!["sub", "--relay", url, filter, "--count", &count];
    for f in key_files {
        args.extend(["--key-file", f]);
    }
    let mut p = Proc::spawn(&args, &[]);
    p.ready();
    p
}

#[test]
fn keygen_writes_a_0600_file_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("me.id");
    let fs = f.to_str().unwrap();
    let public = ok(run(&["keygen", "--out", fs]));
    assert!(public.starts_with("wsid1"), "{public}");
    assert_eq!(public.lines().count(), 1);
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.lines().any(|l| l.starts_with("wssec1")));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // The file is the identity whose public id was printed.
    let id = ok(run(&["id", "--json", "--identity", fs]));
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    assert_eq!(id["public_id"], public.as_str());

    let e = fails(run(&["keygen", "--out", fs]), 1);
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), text, "untouched");

    let again = ok(run(&["keygen", "--out", fs, "--force"]));
    assert_ne!(again, public);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // Without --out: the secret on stdout, a warning on stderr; usable via the env var.
    let o = run(&["keygen"]);
    assert!(stderr(&o).contains("warning:"), "{}", stderr(&o));
    let secret = ok(o);
    assert!(secret.starts_with("wssec1"));
    let o = run_with(&["id", "--json"], "", &[("WHISPEER_IDENTITY", &secret)]);
    assert!(ok(o).contains("wsid1"));
    // …and as a path in the same variable.
    let o = run_with(&["id"], "", &[("WHISPEER_IDENTITY", fs)]);
    assert!(ok(o).contains(&format!("public id: {again}")));
    // The whole identity file pasted into the variable (comment line first) works too.
    let pasted = std::fs::read_to_string(fs).unwrap();
    let o = run_with(&["id"], "", &[("WHISPEER_IDENTITY", &pasted)]);
    assert!(ok(o).contains(&format!("public id: {again}")));
    // A value that is neither a secret of the kind asked for nor a file — a secret with
    // the quotes an env file kept, a tree key where an identity goes — is never repeated
    // in the error (it would land in logs).
    let tree = ok(run(&["key", "new", "--tree", "home"]));
    for (var, value, what) in [
        ("WHISPEER_IDENTITY", format!("\"{secret}\""), "wssec1"),
        ("WHISPEER_IDENTITY", tree.clone(), "wstree1"),
        ("WHISPEER_KEY", format!("'{tree}'"), "wstree1"),
        ("WHISPEER_KEY", secret.clone(), "wssec1"),
    ] {
        let args: &[&str] = if var == "WHISPEER_KEY" {
            &["key", "show"]
        } else {
            &["id"]
        };
        let e = fails(run_with(args, "", &[(var, &value)]), 1);
        assert!(e.contains(var), "{e}");
        assert!(!e.to_ascii_lowercase().contains(what), "secret echoed: {e}");
    }
}

#[test]
fn key_new_and_show() {
    let key = ok(run(&["key", "new", "--tree", "home"]));
    assert!(key.starts_with("wstree1"), "{key}");
    assert_ne!(key, ok(run(&["key", "new", "--tree", "home"])), "random");
    let d = show(&key);
    assert_eq!(d["kind"], "tree");
    assert_eq!(d["tree"], "home");
    assert_eq!(d["scope"], "#");
    assert_eq!(d["epoch"], 0);
    assert_eq!(d["key_id"].as_str().unwrap().len(), 32);
    assert!(d["admin"].as_str().unwrap().starts_with("wspk1"));
    assert!(
        !d.to_string().contains(&key),
        "no secret in the description"
    );

    // Human form, from a key file and from the environment.
    let dir = tempfile::tempdir().unwrap();
    let f = write_file(dir.path(), "k", &format!("# my tree\n{key}\n"));
    let text = ok(run(&["key", "show", "--key-file", f.to_str().unwrap()]));
    assert!(
        text.contains("kind:") && text.contains("tree key"),
        "{text}"
    );
    assert!(text.contains("epoch:     0"), "{text}");
    let text = ok(run_with(&["key", "show"], "", &[("WHISPEER_KEY", &key)]));
    assert!(text.contains("home"), "{text}");
    // --key works but warns.
    let o = run(&["key", "show", "--key", &key]);
    assert!(stderr(&o).contains("warning:"));
    ok(o);
}

#[test]
fn key_derive_narrows_and_cannot_widen() {
    let tree = ok(run(&["key", "new", "--tree", "home"]));
    let tree_id = show(&tree)["key_id"].clone();
    let kitchen = ok(run_with(
        &["key", "derive", "-", "--path", "sensor/kitchen"],
        &tree,
        &[],
    ));
    assert!(kitchen.starts_with("wskey1"));
    let d = show(&kitchen);
    assert_eq!(d["kind"], "grant");
    assert_eq!(d["scope"], "sensor/kitchen/#");
    assert_eq!(d["scope_kind"], "subtree");
    assert_eq!(d["key_id"], tree_id, "same tree and epoch");
    assert_eq!(d["provenance"], "admin-signed", "derived from the tree key");
    // Narrowing a grant records who narrowed it: an identity is needed.
    let e = fails(
        run_with(
            &["key", "derive", "--topic", "sensor/kitchen/temp"],
            "",
            &[("WHISPEER_KEY", &kitchen)],
        ),
        1,
    );
    assert!(e.contains("records who narrowed it"), "{e}");
    let me = ok(run(&["keygen"]));
    let me_sender = ok(run_with(
        &["id", "--json"],
        "",
        &[("WHISPEER_IDENTITY", &me)],
    ));
    let me_sender: serde_json::Value = serde_json::from_str(&me_sender).unwrap();
    // A single topic below it, from the grant (via the env var).
    let temp = ok(run_with(
        &["key", "derive", "--topic", "sensor/kitchen/temp"],
        "",
        &[("WHISPEER_KEY", &kitchen), ("WHISPEER_IDENTITY", &me)],
    ));
    let d = show(&temp);
    assert_eq!(d["scope"], "sensor/kitchen/temp");
    assert_eq!(d["scope_kind"], "topic");
    assert_eq!(d["narrowed_from"], "sensor/kitchen/#");
    assert_eq!(
        d["provenance"],
        format!(
            "narrowed by {} (delegated)",
            me_sender["sender_id"].as_str().unwrap()
        )
    );
    // Siblings and parents are out of reach.
    let e = fails(
        run_with(
            &["key", "derive", "-", "--path", "sensor/garage"],
            &kitchen,
            &[("WHISPEER_IDENTITY", &me)],
        ),
        1,
    );
    assert!(e.contains("outside the grant's scope"), "{e}");
    // --path and --topic are exclusive, and one is required.
    fails(
        run_with(
            &["key", "derive", "-", "--path", "a", "--topic", "a"],
            &tree,
            &[],
        ),
        2,
    );
    fails(run_with(&["key", "derive", "-"], &tree, &[]), 2);
}

#[test]
fn key_upgrade_converts_v1_tree_keys_and_explains_grants() {
    use whispeer::protocol::text::{encode, hrp};
    // A format-1 tree key: 0x01 ‖ tree_id ‖ u64be(epoch) ‖ root ‖ admin seed ‖ lp(name).
    let mut v1 = vec![1u8];
    v1.extend_from_slice(&[0x11; 16]);
    v1.extend_from_slice(&2u64.to_be_bytes());
    v1.extend_from_slice(&[0x22; 32]);
    v1.extend_from_slice(&[0x33; 32]);
    v1.extend_from_slice(&4u16.to_be_bytes());
    v1.extend_from_slice(b"home");
    let old = encode(hrp::TREE, &v1);
    // The old string is refused with a pointer to the upgrade.
    let e = fails(run_with(&["key", "show", "-"], &old, &[]), 1);
    assert!(e.contains("whispeer key upgrade"), "{e}");
    let new = ok(run_with(&["key", "upgrade", "-"], &old, &[]));
    assert!(new.starts_with("wstree1"));
    let d = show(&new);
    assert_eq!(d["epoch"], 2);
    assert_eq!(d["tree"], "home");
    assert_eq!(d["tree_id"], "11".repeat(16));
    // A current string passes through unchanged.
    assert_eq!(ok(run_with(&["key", "upgrade", "-"], &new, &[])), new);
    // A format-1 grant cannot become admin-signed: say so and what to do.
    let g1 = encode(hrp::GRANT, &[1u8, 0, 0, 0]);
    let e = fails(run_with(&["key", "upgrade", "-"], &g1, &[]), 1);
    assert!(e.contains("cannot be upgraded"), "{e}");
    assert!(e.contains("ask the tree admin"), "{e}");
}

#[test]
fn derived_grant_reads_its_subtree_and_cannot_publish_outside() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let kitchen = ok(run_with(
        &["key", "derive", "-", "--path", "sensor/kitchen"],
        &tree,
        &[],
    ));
    let kitchen_file = write_file(dir.path(), "kitchen.key", &kitchen);
    let url = relay.ws_url();

    let mut sub = sub_ready(&url, "sensor/#", 1, &[kitchen_file.to_str().unwrap()]);
    // Outside the grant: published by the admin, never shown to the kitchen subscriber.
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "sensor/garage/temp",
        "1",
        "--key-file",
        tree_file.to_str().unwrap(),
    ]));
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "sensor/kitchen/temp",
        "2",
        "--key-file",
        tree_file.to_str().unwrap(),
    ]));
    let line: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(line["topic"], "sensor/kitchen/temp");
    assert_eq!(line["data"], 2);
    let (status, rest, _) = sub.finish();
    assert!(status.success());
    assert!(rest.is_empty());

    // The grant holder cannot publish outside its subtree.
    let e = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "sensor/garage/temp",
            "3",
            "--key-file",
            kitchen_file.to_str().unwrap(),
        ]),
        1,
    );
    assert!(
        e.contains("no key covers topic 'sensor/garage/temp'"),
        "{e}"
    );
}

/// `sub` is bound to one tree (PROTOCOL §4.11, receiving): with keys of two trees covering
/// the filter it refuses naming both, `--tree TREE_ID` picks one, and then a message the
/// other tree's admin publishes on a matching topic is never printed.
#[test]
fn sub_with_keys_of_two_trees_names_the_tree() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (work_file, work) = new_tree(dir.path(), "work");
    let (mallory_file, mallory) = new_tree(dir.path(), "mallory");
    let alerts = ok(run_with(
        &["key", "derive", "-", "--path", "alerts"],
        &work,
        &[],
    ));
    let alerts_file = write_file(dir.path(), "alerts.key", &alerts);
    let work_id = show(&work)["tree_id"].as_str().unwrap().to_owned();
    let mallory_id = show(&mallory)["tree_id"].as_str().unwrap().to_owned();
    let url = relay.ws_url();
    let keys = [
        "--key-file",
        alerts_file.to_str().unwrap(),
        "--key-file",
        mallory_file.to_str().unwrap(),
    ];

    let mut args = vec!["sub", "--relay", &url, "alerts/#", "--count", "1"];
    args.extend(keys);
    // (The bound only ends a run that, unbound, would wait for a message.)
    let mut refused = args.clone();
    refused.extend(["--timeout", "10"]);
    let e = fails(run(&refused), 1);
    assert!(
        e.contains(&work_id) && e.contains(&mallory_id),
        "names both trees: {e}"
    );

    args.extend(["--tree", &work_id]);
    let mut sub = Proc::spawn(&args, &[]);
    sub.ready();
    for (file, v) in [(&mallory_file, "1"), (&work_file, "2")] {
        ok(run(&[
            "pub",
            "--relay",
            &url,
            "alerts/fire",
            v,
            "--key-file",
            file.to_str().unwrap(),
        ]));
    }
    let line: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(line["data"], 2, "the other tree's message is not printed");
    assert_eq!(line["tree"], work_id.as_str());
    let (status, rest, _) = sub.finish();
    assert!(status.success());
    assert!(rest.is_empty());

    let bad = fails(run(&["sub", "alerts/#", "--tree", "xyz"]), 2);
    assert!(bad.contains("--tree"), "{bad}");
}

#[test]
fn from_passphrase_is_deterministic_and_never_from_argv() {
    let a = ok(run_with(
        &["key", "from-passphrase", "--tree", "family"],
        "correct horse battery staple\n",
        &[],
    ));
    assert!(a.starts_with("wstree1"));
    let b = ok(run_with(
        &["key", "from-passphrase", "--tree", "family"],
        "",
        &[("WHISPEER_PASSPHRASE", "correct horse battery staple")],
    ));
    assert_eq!(a, b, "stdin and env agree");
    let c = ok(run_with(
        &["key", "from-passphrase", "--tree", "family"],
        "another passphrase\n",
        &[],
    ));
    assert_ne!(a, c);
    let d = ok(run_with(
        &["key", "from-passphrase", "--tree", "friends"],
        "correct horse battery staple\n",
        &[],
    ));
    assert_ne!(a, d, "the tree name is part of the salt");
    assert_eq!(show(&a)["tree"], "family");
    // No passphrase → usage error; no flag takes one on the command line.
    fails(
        run_with(&["key", "from-passphrase", "--tree", "family"], "", &[]),
        2,
    );
    fails(
        run(&[
            "key",
            "from-passphrase",
            "--tree",
            "family",
            "--passphrase",
            "x",
        ]),
        2,
    );
}

#[test]
fn invite_seal_and_open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, _, alice_sender) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, _) = keygen(dir.path(), "bob.id");
    let (eve, _, _) = keygen(dir.path(), "eve.id");
    let (tree_file, tree) = new_tree(dir.path(), "home");

    let inv = ok(run(&[
        "invite",
        "seal",
        "--to",
        &bob_public,
        "--path",
        "sensor",
        "--identity",
        alice.to_str().unwrap(),
        "--key-file",
        tree_file.to_str().unwrap(),
    ]));
    assert!(inv.starts_with("wsinv1"), "{inv}");
    assert_eq!(show(&inv)["kind"], "invite");

    let (key, err) = open_invite(&bob, &inv, &[]);
    // Sealed from the tree key: signed by the tree's admin key, not alice's identity
    // (an_admins_invite_says_the_admin_enrolled_you).
    let admin = show(&tree)["admin"].as_str().unwrap().to_owned();
    assert!(err.contains(&format!("invite from {admin} ")), "{err}");
    let d = show(&key);
    assert_eq!(d["scope"], "sensor/#");
    assert_eq!(d["key_id"], show(&tree)["key_id"]);
    // The same, with the invite as an argument.
    let again = ok(run(&[
        "invite",
        "open",
        &inv,
        "--identity",
        bob.to_str().unwrap(),
    ]));
    assert_eq!(again, key);

    // Not for Eve.
    let e = fails(
        run_with(
            &["invite", "open", "--identity", eve.to_str().unwrap()],
            &inv,
            &[],
        ),
        1,
    );
    assert!(e.contains("could not be opened"), "{e}");
    // A sender id is not a public id; sealing needs an identity.
    let e = fails(
        run(&[
            "invite",
            "seal",
            "--to",
            &alice_sender,
            "--identity",
            alice.to_str().unwrap(),
            "--key-file",
            tree_file.to_str().unwrap(),
        ]),
        2,
    );
    assert!(e.contains("public id"), "{e}");
    // Signing as yourself (--as-me, or from a grant) needs an identity.
    let e = fails(
        run(&[
            "invite",
            "seal",
            "--to",
            &bob_public,
            "--as-me",
            "--key-file",
            tree_file.to_str().unwrap(),
        ]),
        2,
    );
    assert!(e.contains("no identity given"), "{e}");
    let e = fails(
        run_with(&["invite", "seal", "--to", &bob_public, "-"], &key, &[]),
        2,
    );
    assert!(e.contains("no identity given"), "{e}");
}

/// Raw bytes an attacker-chosen tree name or scope must never reach the terminal with: ESC
/// (erase the line, conceal), CR and LF (overwrite or add lines), a C1 CSI, DEL, and the bidi
/// override and isolate characters (reorder what is shown).
const HOSTILE: &[char] = &[
    '\u{1b}', '\r', '\n', '\u{9b}', '\u{7f}', '\u{202e}', '\u{2066}', '\u{2069}',
];

/// No hostile character inside any line (the line breaks themselves are the output's; a
/// raw LF from a name shows up as an extra line, which the callers count).
fn assert_no_hostile(what: &str, text: &str) {
    for line in text.split('\n') {
        let bad: Vec<char> = line.chars().filter(|c| HOSTILE.contains(c)).collect();
        assert!(bad.is_empty(), "{what} holds raw {bad:?}: {text:?}");
    }
}

/// Errors carry text others chose (a grant's scope, a relay's message): the `error:` line is
/// one line with every control and bidi character escaped (review F4).
#[test]
fn error_lines_escape_control_characters_others_chose() {
    let tree = ok(run(&["key", "new", "--tree", "home"]));
    let hostile = ok(run_with(
        &["key", "derive", "-", "--path", "sensor\u{1b}]0;x"],
        &tree,
        &[],
    ));
    let me = ok(run(&["keygen"]));
    let o = run_with(
        &["key", "derive", "--path", "other", "-"],
        &hostile,
        &[("WHISPEER_IDENTITY", &me)],
    );
    let err = stderr(&o);
    let e = fails(o, 1);
    assert!(e.contains("outside the grant's scope"), "{e}");
    assert!(!err.contains('\u{1b}'), "raw ESC on stderr: {err:?}");
    assert_no_hostile("key derive stderr", &err);
    assert!(
        e.contains(r"sensor\u{1b}]0;x"),
        "the scope is shown escaped: {e}"
    );
}

/// `invite open` prints one line the receiver bases the trust decision on (PROTOCOL §7):
/// the tree id and the certificate's admin key, which a tree named like another cannot copy,
/// and the grant's provenance, before the free-text scope and tree name; those are escaped,
/// so a name cannot rewrite the line or the terminal. `key show` escapes them too, and
/// `--json` keeps them exact while writing the dangerous characters as `\u` escapes.
#[test]
fn invite_open_names_the_tree_and_escapes_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, _, alice_sender) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, _) = keygen(dir.path(), "bob.id");
    let name = "home' (epoch 0)\r\u{1b}[2Kinvite from x\nfake\u{202e}kcab\u{9b}31m\u{7f}";
    let (tree_file, tree) = new_tree(dir.path(), name);
    let td = show(&tree);
    assert_eq!(td["tree"], name, "--json keeps the exact name");
    let (tree_id, admin) = (
        td["tree_id"].as_str().unwrap(),
        td["admin"].as_str().unwrap(),
    );
    let open = |inv: &str| {
        let (key, err) = open_invite(&bob, inv, &[]);
        assert_no_hostile("invite open stderr", &err);
        assert_no_hostile("invite open stdout", &key);
        // A member (alice), not the admin key, sealed it: the old-epoch warning (§10) follows.
        let (line, warning) = err.trim_end().split_once('\n').expect("two lines");
        assert!(
            warning.starts_with("warning: a member gave you epoch 0 of this tree;"),
            "{warning}"
        );
        assert_eq!(err.lines().count(), 2, "one line for the invite: {err:?}");
        let line = line.to_owned();
        assert!(
            line.starts_with(&format!("invite from {alice_sender} ")),
            "{line}"
        );
        assert!(line.contains(&format!("tree {tree_id}")), "{line}");
        assert!(line.contains(&format!("admin: {admin}")), "{line}");
        assert!(
            line.contains(r"\u{1b}[2K") && line.contains(r"\u{202e}"),
            "{line}"
        );
        // The identifying fields come before any attacker-chosen text.
        assert!(
            line.find(admin).unwrap() < line.find("[2K").unwrap(),
            "{line}"
        );
        (key, line)
    };

    // Admin-signed, for a scope whose path holds an escape too; sealed by alice's identity
    // (--as-me; a grant always is).
    let seal = |key_file: &Path, path: &str| {
        ok(run(&[
            "invite",
            "seal",
            "--to",
            &bob_public,
            "--path",
            path,
            "--as-me",
            "--identity",
            alice.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ]))
    };
    let (key, line) = open(&seal(&tree_file, "sensor\u{1b}]0;x"));
    assert!(line.contains("admin-signed"), "{line}");
    assert!(line.contains(r"'sensor\u{1b}]0;x/#'"), "{line}");

    // Narrowed from a grant: the narrower is named.
    let grant_file = write_file(dir.path(), "grant.key", &format!("{key}\n"));
    let (narrowed, line) = open(&seal(&grant_file, "sensor\u{1b}]0;x/kitchen"));
    assert!(
        line.contains(&format!("narrowed by {alice_sender}")),
        "{line}"
    );

    // `key show`: every line is one labelled field; the name and scope are escaped.
    for k in [&tree, &narrowed] {
        let text = ok(run_with(&["key", "show", "-"], k, &[]));
        assert_no_hostile("key show", &text);
        for l in text.lines() {
            let label = l.split_once(':').map(|(a, _)| a).unwrap_or(l);
            assert!(
                !label.is_empty() && label.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
                "every line is a labelled field: {l:?} in {text:?}"
            );
        }
        let tree_line = text.lines().find(|l| l.starts_with("tree:")).unwrap();
        assert!(tree_line.contains(r"\r\u{1b}[2K"), "{tree_line}");
        // --json: parses back to the exact text, with no raw control or bidi character.
        let o = run_with(&["key", "show", "--json", "-"], k, &[]);
        let json = ok(o);
        assert_no_hostile("key show --json", &json);
        let d: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(d["tree"], name);
    }
    assert_eq!(show(&narrowed)["scope"], "sensor\u{1b}]0;x/kitchen/#");
}

/// `invite seal` from a tree key signs with the tree's admin key (`TreeKey::admin_identity`),
/// not the user's identity — none is needed, and one given is not used — so `invite open`
/// says the admin enrolled the recipient and prints no member warning (PROTOCOL §7, §10).
#[test]
fn an_admins_invite_says_the_admin_enrolled_you() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, _, alice_sender) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, _) = keygen(dir.path(), "bob.id");
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let admin = show(&tree)["admin"].as_str().unwrap().to_owned();
    for with_identity in [true, false] {
        let mut args = vec!["invite", "seal", "--to", &bob_public, "--path", "sensor"];
        if with_identity {
            args.extend(["--identity", alice.to_str().unwrap()]);
        }
        args.extend(["--key-file", tree_file.to_str().unwrap()]);
        let o = run(&args);
        let sealed = stderr(&o);
        let inv = ok(o);
        let (key, err) = open_invite(&bob, &inv, &[]);
        assert_eq!(show(&key)["scope"], "sensor/#");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines[0].starts_with(&format!("invite from {admin} ")),
            "{err}"
        );
        assert!(lines[0].ends_with("admin-signed"), "{err}");
        assert_eq!(
            lines[1],
            "the tree's admin key signed this invite: the admin enrolled you"
        );
        assert!(!err.contains("warning"), "{err}");
        assert!(!err.contains(&alice_sender), "{err}");
        assert!(
            sealed.contains(&format!("signed by the tree's admin key {admin}")),
            "{sealed}"
        );
    }
}

/// An invite a member seals from her grant (no admin secret) is signed by her identity, and
/// `invite open` warns that a member gave the epoch (PROTOCOL §10); so does an admin's
/// invite sealed with `--as-me`. The sealer is told which key signed.
#[test]
fn a_members_invite_warns_to_confirm_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, _, alice_sender) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, bob_sender) = keygen(dir.path(), "bob.id");
    let (carol, carol_public, _) = keygen(dir.path(), "carol.id");
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let admin = show(&tree)["admin"].as_str().unwrap().to_owned();
    let open_as_carol = |inv: &str| open_invite(&carol, inv, &[]).1;
    let member_warning = "warning: a member gave you epoch 0 of this tree; a member removed \
                          by a key rotation can still hand out the old epoch — confirm with \
                          the admin that 0 is current";

    // Bob holds the whole tree as a grant (wskey1…): the admin's invite, opened.
    let inv = ok(run(&[
        "invite",
        "seal",
        "--to",
        &bob_public,
        "--identity",
        alice.to_str().unwrap(),
        "--key-file",
        tree_file.to_str().unwrap(),
    ]));
    let (bob_key, _) = open_invite(&bob, &inv, &[]);
    assert!(bob_key.starts_with("wskey1"), "{bob_key}");
    let bob_file = write_file(dir.path(), "bob.key", &format!("{bob_key}\n"));

    // Bob seals his grant (whole, and narrowed) to Carol: his identity signs.
    for narrow in [&[][..], &["--path", "sensor"][..]] {
        let mut args = vec![
            "invite",
            "seal",
            "--to",
            &carol_public,
            "--identity",
            bob.to_str().unwrap(),
            "--key-file",
            bob_file.to_str().unwrap(),
        ];
        args.extend_from_slice(narrow);
        let o = run(&args);
        let sealed = stderr(&o);
        let inv = ok(o);
        let err = open_as_carol(&inv);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines[0].starts_with(&format!("invite from {bob_sender} ")),
            "{err}"
        );
        assert_eq!(lines[1], member_warning);
        assert!(!err.contains("admin enrolled you"), "{err}");
        assert!(
            sealed.contains(&format!(
                "signed by your identity {bob_sender} (not the tree's admin key {admin})"
            )),
            "{sealed}"
        );
    }

    // The admin may still sign as herself: --as-me, and Carol is warned.
    let o = run(&[
        "invite",
        "seal",
        "--to",
        &carol_public,
        "--as-me",
        "--identity",
        alice.to_str().unwrap(),
        "--key-file",
        tree_file.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains(&format!("signed by your identity {alice_sender}")),
        "{}",
        stderr(&o)
    );
    let err = open_as_carol(&ok(o));
    assert!(
        err.starts_with(&format!("invite from {alice_sender} ")),
        "{err}"
    );
    assert_eq!(err.lines().nth(1), Some(member_warning), "{err}");
}

/// `samples.jsonl`: 300 telemetry readings, one JSON object per line (to train on).
fn telemetry_samples(dir: &Path) -> PathBuf {
    let samples: String = (0..300)
        .map(|i| {
            format!(
                "{{\"device\":\"th-{:04}\",\"room\":\"{}\",\"seq\":{i},\"celsius\":{}.{},\"humidity\":{},\"ok\":true}}\n",
                i * 37 % 9973,
                ["kitchen", "garage", "attic", "hall"][i % 4],
                15 + i % 12,
                i % 10,
                30 + i % 40
            )
        })
        .collect();
    write_file(dir, "samples.jsonl", &samples)
}

/// A dictionary trained on [`telemetry_samples`] (`dict train`, 4 KiB) and its `wsdict1…`
/// key file (`dict export`): (dictionary file, key file, id).
fn new_dictionary(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let raw = dir.join(format!("{name}.dict"));
    ok(run(&[
        "dict",
        "train",
        "--samples",
        telemetry_samples(dir).to_str().unwrap(),
        "--lines",
        "--size",
        "4096",
        "-o",
        raw.to_str().unwrap(),
    ]));
    let key = dir.join(format!("{name}.dict.key"));
    ok(run(&[
        "dict",
        "export",
        raw.to_str().unwrap(),
        "--out",
        key.to_str().unwrap(),
    ]));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(run(&["dict", "show", "--json", raw.to_str().unwrap()]))).unwrap();
    (raw, key, shown["id"].as_str().unwrap().to_owned())
}

/// `pub --qos 1 --dict DICT` of a telemetry reading (like [`telemetry_samples`], with
/// `celsius`) on `tele/kitchen`.
fn pub_reading_with_dict(url: &str, key_file: &str, dict: &str, celsius: &str) {
    let value = format!(
        r#"{{"device":"th-0042","room":"kitchen","seq":7,"celsius":{celsius},"humidity":44,"ok":true}}"#
    );
    ok(run(&[
        "pub",
        "--relay",
        url,
        "tele/kitchen",
        &value,
        "--qos",
        "1",
        "--key-file",
        key_file,
        "--dict",
        dict,
    ]));
}

/// `key show` describes a `wsdict1…` string (an argument, stdin, or a key file line next
/// to a tree key) with the fields of `dict show`, and refuses a damaged one.
#[test]
fn key_show_describes_a_dictionary() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, dict_key, id) = new_dictionary(dir.path(), "d");
    let s = std::fs::read_to_string(&dict_key)
        .unwrap()
        .trim()
        .to_owned();
    let d = show(&s);
    let dict_show: serde_json::Value =
        serde_json::from_str(&ok(run(&["dict", "show", "--json", raw.to_str().unwrap()]))).unwrap();
    assert_eq!(d["kind"], "dictionary");
    for k in ["id", "bytes", "zstd_format", "format", "compress"] {
        assert_eq!(d[k], dict_show[k], "{k}");
    }
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["format"], "zstd format");
    let len = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(d["bytes"], len);

    // A key file holding a tree key and the dictionary: both described, in order.
    let (_, tree) = new_tree(dir.path(), "home");
    let both = write_file(
        dir.path(),
        "both.key",
        &format!("{tree}\n# dictionary\n{s}\n"),
    );
    let lines = ok(run(&[
        "key",
        "show",
        "--json",
        "--key-file",
        both.to_str().unwrap(),
    ]));
    let kinds: Vec<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(kinds, ["\"tree\"", "\"dictionary\""]);
    let human = ok(run(&[
        "key",
        "show",
        "--key-file",
        dict_key.to_str().unwrap(),
    ]));
    assert!(human.contains("zstd dictionary"), "{human}");
    assert!(human.contains(&format!("id:        {id}")), "{human}");
    assert!(
        human.contains(&format!("size:      {len} bytes")),
        "{human}"
    );
    assert!(human.contains("format:    zstd format"), "{human}");

    // One character changed: refused (checksum or id), with one error line.
    let mut damaged = s.clone().into_bytes();
    let i = damaged.len() / 2;
    damaged[i] = if damaged[i] == b'q' { b'p' } else { b'q' };
    let e = fails(
        run_with(
            &["key", "show", "-"],
            std::str::from_utf8(&damaged).unwrap(),
            &[],
        ),
        1,
    );
    assert!(e.contains("dictionary"), "{e}");
}

/// `invite seal` carries the dictionaries next to the key (a `wsdict1…` line in the key
/// file, or `--dict`), `invite open` prints the grant and them as a key file, and the
/// invitee — holding only that — reads a message `pub --dict` compressed with it, over the
/// real relay. `--no-dicts` seals the format-2 invite.
#[test]
fn invite_carries_dictionaries_to_the_invitee() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (alice, _, _) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, _) = keygen(dir.path(), "bob.id");
    let (raw, dict_key, id) = new_dictionary(dir.path(), "tele");
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let dict_line = std::fs::read_to_string(&dict_key).unwrap();
    write_file(dir.path(), "admin.key", &format!("{tree}\n{dict_line}"));
    let seal = |extra: &[&str]| {
        let mut args = vec![
            "invite",
            "seal",
            "--to",
            &bob_public,
            "--path",
            "tele",
            "--identity",
            alice.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let open = |inv: &str, out: &str| {
        let (_, err) = open_invite(&bob, inv, &["--out", out]);
        (std::fs::read_to_string(out).unwrap(), err)
    };

    // From the key file holding the tree key and the dictionary: the grant is narrowed
    // (--path tele), so it travels with --with-dicts only (see
    // a_narrowed_invite_leaves_the_key_files_dictionaries_behind).
    let o = seal(&["--key-file", &path("admin.key"), "--with-dicts"]);
    assert!(
        stderr(&o).contains(&format!("1 zstd dictionary: {id}")),
        "{}",
        stderr(&o)
    );
    let inv = ok(o);
    assert_eq!(show(&inv)["format"], 3);
    let (bob_keys, err) = open(&inv, &path("bob.key"));
    assert!(err.contains(&id), "{err}");
    let lines: Vec<&str> = bob_keys.lines().collect();
    assert_eq!(lines.len(), 2, "{bob_keys}");
    assert_eq!(show(lines[0])["scope"], "tele/#");
    assert_eq!(show(lines[1])["id"], id.as_str());

    // From --dict with a key file of the tree key alone: the same dictionary.
    let with_flag = ok(seal(&[
        "--key-file",
        tree_file.to_str().unwrap(),
        "--dict",
        raw.to_str().unwrap(),
    ]));
    let (again, _) = open(&with_flag, &path("bob2.key"));
    assert_eq!(again, bob_keys);
    // A key file named as the dictionary by mistake is refused, not shipped to the
    // invitee (any file of the right size would do as a raw dictionary).
    let e = fails(
        seal(&[
            "--key-file",
            tree_file.to_str().unwrap(),
            "--dict",
            tree_file.to_str().unwrap(),
        ]),
        1,
    );
    assert!(e.contains("not a dictionary"), "{e}");
    assert!(!e.contains(&tree), "{e}");
    // So is a relay account key (`auth-keygen --out`) and a PEM private key of any label,
    // wherever in the file (after a BOM, blank lines or a comment): each error names what
    // was found and quotes none of it.
    ok(run(&["auth-keygen", "--out", &path("acct.key")]));
    let acct = std::fs::read_to_string(path("acct.key")).unwrap();
    let pem_body = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";
    let secrets = [
        ("acct.key", acct.clone(), "relay account key (wsp_acct_sk_"),
        (
            "pkcs8.pem",
            format!("-----BEGIN PRIVATE KEY-----\n{pem_body}\n-----END PRIVATE KEY-----\n"),
            "PEM private key",
        ),
        (
            "ssh.key",
            format!(
                "\u{feff}\n  -----BEGIN OPENSSH PRIVATE KEY-----\n{pem_body}\n\
                 -----END OPENSSH PRIVATE KEY-----\n"
            ),
            "PEM private key",
        ),
        (
            "ec.pem",
            format!(
                "# mine\n-----BEGIN EC PRIVATE KEY-----\n{pem_body}\n-----END EC PRIVATE KEY-----"
            ),
            "PEM private key",
        ),
        (
            "rsa.pem",
            format!("-----BEGIN RSA PRIVATE KEY-----\n{pem_body}\n-----END RSA PRIVATE KEY-----"),
            "PEM private key",
        ),
        (
            "token.txt",
            format!("wsp_tok_{}\n", "ab".repeat(32)),
            "bearer token",
        ),
    ];
    for (name, text, named) in &secrets {
        write_file(dir.path(), name, text);
        let e = fails(
            seal(&[
                "--key-file",
                tree_file.to_str().unwrap(),
                "--dict",
                &path(name),
            ]),
            1,
        );
        assert!(
            e.contains("not a dictionary") && e.contains(named),
            "{name}: {e}"
        );
        assert!(
            !e.contains(pem_body) && !e.contains(acct.trim()),
            "{name}: {e}"
        );
    }
    // --no-dicts: the format-2 invite, the grant alone.
    let plain = ok(seal(&["--key-file", &path("admin.key"), "--no-dicts"]));
    assert_eq!(show(&plain)["format"], 2);
    let (grant_only, _) = open(&plain, &path("bob3.key"));
    assert_eq!(grant_only.lines().count(), 1);

    // Bob, with only what the invite carried, reads a message compressed with the dictionary.
    let relay = start_relay_binary(&[]);
    let url = relay.ws_url();
    let mut bob_sub = sub_ready(&url, "tele/#", 1, &[&path("bob.key")]);
    // The grant alone (the format-2 invite) cannot read it: the message is codec 3.
    let mut grant_only = sub_ready(&url, "tele/#", 1, &[&path("bob3.key")]);
    pub_reading_with_dict(
        &url,
        tree_file.to_str().unwrap(),
        raw.to_str().unwrap(),
        "19.5",
    );
    let l: serde_json::Value = serde_json::from_str(&bob_sub.line()).unwrap();
    assert_eq!(l["topic"], "tele/kitchen");
    assert_eq!(l["data"]["celsius"], 19.5);
    let (status, _, _) = bob_sub.finish();
    assert!(status.success());
    grant_only.missing_dictionary(&id);
}

/// The keys do not record which topics a dictionary serves, so an invite narrowed with
/// `--path`/`--topic` leaves the key file's `wsdict1…` lines behind (and says so): an admin
/// inviting someone to `sensor/#` does not hand them a dictionary trained on other topics.
/// Un-narrowed, the invite carries them as before; `--with-dicts` carries them anyway.
#[test]
fn a_narrowed_invite_leaves_the_key_files_dictionaries_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (alice, _, _) = keygen(dir.path(), "alice.id");
    let (bob, bob_public, _) = keygen(dir.path(), "bob.id");
    let (_, dict_key, id) = new_dictionary(dir.path(), "private");
    let (_, tree) = new_tree(dir.path(), "home");
    let dict_line = std::fs::read_to_string(&dict_key).unwrap();
    write_file(dir.path(), "admin.key", &format!("{tree}\n{dict_line}"));
    let seal = |extra: &[&str]| {
        let admin = path("admin.key");
        let mut args = vec![
            "invite",
            "seal",
            "--to",
            &bob_public,
            "--identity",
            alice.to_str().unwrap(),
            "--key-file",
            &admin,
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        let err = stderr(&o);
        (ok(o), err)
    };
    let opened = std::cell::Cell::new(0);
    let open = |inv: &str| {
        opened.set(opened.get() + 1);
        let out = path(&format!("bob{}.key", opened.get()));
        open_invite(&bob, inv, &["--out", &out]);
        std::fs::read_to_string(out).unwrap()
    };

    // Narrowed to sensor/#: the grant alone (format 2), and a warning naming the way back.
    let (inv, err) = seal(&["--path", "sensor"]);
    assert_eq!(show(&inv)["format"], 2, "{err}");
    let keys = open(&inv);
    assert!(!keys.to_ascii_lowercase().contains("wsdict1"), "{keys}");
    assert_eq!(show(keys.trim())["scope"], "sensor/#");
    assert!(
        err.contains("carries none") && err.contains(&id) && err.contains("--with-dicts"),
        "{err}"
    );
    // So with --topic.
    let (inv, _) = seal(&["--topic", "sensor/kitchen"]);
    assert!(!open(&inv).to_ascii_lowercase().contains("wsdict1"));

    // Un-narrowed (the whole tree): the dictionary travels, as before.
    let (inv, err) = seal(&[]);
    assert_eq!(show(&inv)["format"], 3, "{err}");
    let keys = open(&inv);
    assert!(keys.lines().any(|l| l == dict_line.trim()), "{keys}");
    assert!(!err.contains("carries none"), "{err}");
    // Narrowed with --with-dicts: carried, as asked.
    let (inv, _) = seal(&["--path", "sensor", "--with-dicts"]);
    assert!(open(&inv).lines().any(|l| l == dict_line.trim()));
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Reading {
    temp: f64,
    room: String,
}

/// `pub` | `sub` between two processes; the printed line has the documented shape.
fn pub_sub_round_trip(relay: &RelayProcess, url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (alice, _, alice_sender) = keygen(dir.path(), "alice.id");
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap();

    // A typed Rust subscriber (the library) as a third party.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grant: whispeer::Grant = show_grant(&tree);
    let mut keys = whispeer::Keyring::new();
    keys.add_grant(grant).unwrap();
    let (typed_client, mut typed) = rt.block_on(async {
        let c = support::ws_client(&relay.ws_url(), keys, support::identity()).await;
        let s = c.subscribe::<Reading>("sensor/+/temp").await.unwrap();
        (c, s)
    });

    let mut sub = Proc::spawn(
        &["sub", "--relay", url, "sensor/+/temp", "--count", "3"],
        &[("WHISPEER_KEY", tf)],
    );
    sub.ready();

    ok(run(&[
        "pub",
        "--relay",
        url,
        "sensor/kitchen/temp",
        r#"{"temp": 21.5, "room": "kitchen"}"#,
        "--key-file",
        tf,
        "--identity",
        alice.to_str().unwrap(),
    ]));
    let first = sub.line();
    // Exact shape and field order.
    let order: Vec<usize> = [
        "topic",
        "sender",
        "seq",
        "id",
        "ts",
        "data",
        "tree",
        "epoch",
        "provenance",
    ]
    .iter()
    .map(|k| {
        first
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} missing in {first}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{first}");
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 9, "{first}");
    assert_eq!(v["topic"], "sensor/kitchen/temp");
    assert_eq!(v["sender"], alice_sender.as_str());
    assert!(v["seq"].is_u64());
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(v["ts"].as_u64().unwrap() > 0);
    assert_eq!(
        v["data"],
        serde_json::json!({"temp": 21.5, "room": "kitchen"})
    );
    let d = show(&tree);
    assert_eq!(v["tree"], d["tree_id"]);
    assert_eq!(v["epoch"], d["epoch"]);
    assert_eq!(v["provenance"], serde_json::json!({"kind": "admin-signed"}));

    // JSON lines from stdin, unsigned (no identity): two messages, blank lines skipped.
    ok(run_with(
        &[
            "pub",
            "--relay",
            url,
            "sensor/garage/temp",
            "--key-file",
            tf,
        ],
        "{\"temp\": 5.0, \"room\": \"garage\"}\n\n[1, \"two\", null]\n",
        &[],
    ));
    let l2: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    let l3: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(l2["topic"], "sensor/garage/temp");
    assert_eq!(l2["sender"], serde_json::Value::Null);
    assert_eq!(l2["data"]["room"], "garage");
    assert_eq!(l3["data"], serde_json::json!([1, "two", null]));
    assert_ne!(l2["id"], l3["id"]);
    let (status, rest, _) = sub.finish();
    assert!(status.success(), "exit 0 after --count messages");
    assert!(rest.is_empty());

    // The typed subscriber read the first two as `Reading`; the array is a typed error.
    rt.block_on(async {
        let m = support::within("typed message", typed.next_message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.value,
            Reading {
                temp: 21.5,
                room: "kitchen".into()
            }
        );
        assert_eq!(m.sender.unwrap().to_string(), alice_sender);
        let m = support::within("typed message", typed.next_message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value.room, "garage");
        let e = support::within("typed error", typed.next_message())
            .await
            .unwrap();
        assert!(e.is_err());
        typed_client.close().await;
    });
}

/// Peak resident memory of a running process (`VmHWM`), in KiB.
#[cfg(target_os = "linux")]
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A member's zstd-compressed CBOR `[[], [], …]` (some 1 KB on the wire, 16 MB delivered)
/// would cost `sub` about 1 GiB as decoded trees. It is skipped with a warning naming the
/// (escaped) topic before anything is decoded, and the next message prints (review F5).
#[cfg(target_os = "linux")]
#[test]
fn sub_skips_a_cbor_payload_too_large_to_print_in_bounded_memory() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let mut sub = Proc::spawn(
        &["sub", "--relay", &relay.ws_url(), "t/#", "--count", "2"],
        &[("WHISPEER_KEY", tree_file.to_str().unwrap())],
    );
    sub.ready();
    let mut bomb = vec![0x80u8; 16_000_002];
    bomb[0] = 0x9f;
    *bomb.last_mut().unwrap() = 0xff;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut keys = whispeer::Keyring::new();
    keys.add_grant(show_grant(&tree)).unwrap();
    rt.block_on(async {
        // Compression::zstd(3), as every support client.
        let c = support::ws_client(&relay.ws_url(), keys, support::identity()).await;
        c.publish_bytes("t/bomb\u{1b}[2K", "application/cbor", &bomb)
            .await
            .unwrap();
        c.publish("t/ok", &[1u8, 2]).await.unwrap();
        c.flush().await.unwrap();
        c.close().await;
    });
    drop(bomb);
    // In order: once a line is printed the first message was handled.
    let line = sub.line();
    let peak_mib = peak_rss_kib(sub.child.id()) / 1024;
    eprintln!("sub peak RSS with the 16 MB CBOR payload: {peak_mib} MiB");
    assert!(peak_mib < 300, "sub peaked at {peak_mib} MiB");
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["topic"], "t/ok");
    assert_eq!(line["data"], serde_json::json!([1, 2]));
    let warning = loop {
        let l = sub.err.recv_timeout(TIMEOUT).expect("a warning line");
        if l.starts_with("warning:") {
            break l;
        }
    };
    assert!(
        warning.contains(r"skipping a message on t/bomb\u{1b}[2K")
            && warning.contains("too large to print as JSON"),
        "{warning}"
    );
}

fn show_grant(tree: &str) -> whispeer::Grant {
    whispeer::TreeKey::from_key_string(tree)
        .unwrap()
        .grant_all()
}

#[test]
fn pub_sub_round_trip_over_websocket() {
    let relay = start_relay_binary(&[]);
    let url = relay.ws_url();
    pub_sub_round_trip(&relay, &url);
}

#[test]
fn pub_sub_round_trip_over_tcp() {
    let relay = start_relay_binary(&[]);
    let url = relay.tcp_url();
    pub_sub_round_trip(&relay, &url);
}

/// A relay, a fresh tree "home" (its key file's path) and a `sub a/#` of it ready for
/// `count` messages.
fn relay_tree_and_sub(count: &str) -> (RelayProcess, tempfile::TempDir, String, String, Proc) {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap().to_owned();
    let url = relay.tcp_url();
    let mut sub = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "a/#",
            "--count",
            count,
            "--key-file",
            &tf,
        ],
        &[],
    );
    sub.ready();
    (relay, dir, tf, url, sub)
}

/// Review 27b, C3: `sub` lines carry no raw C1 controls, DEL or bidi overrides from a
/// member's topic or payload (serde_json escapes only C0); the JSON reads back the same.
#[test]
fn sub_lines_escape_terminal_controls_and_read_back_the_same() {
    let (_relay, _dir, tree_file, url, mut sub) = relay_tree_and_sub("1");
    let tf = tree_file.as_str();
    // The payload as JSON text (escapes the CLI parses), the topic as the raw characters.
    let payload = r#""x\u009b2J\u007f\u202ey""#;
    let topic = "a/t\u{9b}\u{202e}";
    ok(run(&[
        "pub",
        "--relay",
        &url,
        topic,
        payload,
        "--key-file",
        tf,
    ]));
    let line = sub.line();
    assert!(
        !line
            .chars()
            .any(|c| matches!(c, '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}')),
        "{line:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"], "x\u{9b}2J\u{7f}\u{202e}y");
    assert_eq!(v["topic"], topic);
}

#[test]
fn pub_count_and_qos_with_acknowledgements() {
    let (_relay, _dir, tree_file, url, mut sub) = relay_tree_and_sub("5");
    let tf = tree_file.as_str();
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "a/b",
        "\"x\"",
        "--count",
        "3",
        "--qos",
        "1",
        "--key-file",
        tf,
    ]));
    let seqs: Vec<u64> = (0..3)
        .map(|_| {
            let v: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
            assert_eq!(v["data"], "x");
            v["seq"].as_u64().unwrap()
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The sealer's codec and suite (issue 11): the subscriber opens every combination.
    let long = format!("\"{}\"", "lz4 and aes-gcm ".repeat(40));
    for (compress, suite) in [("lz4", "aes-gcm"), ("zstd:9", "xchacha")] {
        ok(run(&[
            "pub",
            "--relay",
            &url,
            "a/c",
            &long,
            "--compress",
            compress,
            "--suite",
            suite,
            "--qos",
            "1",
            "--key-file",
            tf,
        ]));
        let v: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
        assert_eq!(
            v["data"].as_str().unwrap().len(),
            16 * 40,
            "{compress} {suite}"
        );
    }
    assert!(sub.finish().0.success());
    // Usage errors (exit 2) name the bad value.
    for bad in [["--qos", "3"], ["--suite", "des"], ["--compress", "lz5"]] {
        let e = fails(
            run(&[
                "pub",
                "--relay",
                &url,
                "a/b",
                "1",
                bad[0],
                bad[1],
                "--key-file",
                tf,
            ]),
            2,
        );
        assert!(e.contains(bad[1]), "{e}");
    }
}

#[test]
fn sub_count_and_timeout_exit_codes() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap();
    let url = relay.ws_url();

    // --count not reached before --timeout: exit 1 with a clear message.
    let mut p = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "quiet/#",
            "--count",
            "1",
            "--timeout",
            "0.3",
            "--key-file",
            tf,
        ],
        &[],
    );
    p.ready();
    let (status, out, err) = p.finish();
    assert_eq!(status.code(), Some(1), "{err:?}");
    assert!(out.is_empty());
    let errors: Vec<&String> = err.iter().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err:?}");
    assert!(errors[0].contains("timed out") && errors[0].contains("0 of 1"));

    // Without --count the timeout simply ends the run.
    let mut p = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "quiet/#",
            "--timeout",
            "0.2",
            "--key-file",
            tf,
        ],
        &[],
    );
    p.ready();
    let (status, out, err) = p.finish();
    assert!(status.success(), "{err:?}");
    assert!(out.is_empty());

    // --count reached: exit 0 even with a timeout left.
    let mut p = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "quiet/#",
            "--count",
            "1",
            "--timeout",
            "600",
            "--key-file",
            tf,
        ],
        &[],
    );
    p.ready();
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "quiet/x",
        "{}",
        "--key-file",
        tf,
    ]));
    let (status, out, _) = p.finish();
    assert!(status.success());
    assert_eq!(out.len(), 1);
}

#[test]
fn bad_input_gets_one_line_errors_and_nonzero_exit() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, tree) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap();
    let url = relay.ws_url();

    // Malformed key strings: a flipped character, garbage, and the wrong kind.
    let mut bad = tree.clone().into_bytes();
    let i = bad.len() - 3;
    bad[i] = if bad[i] == b'q' { b'p' } else { b'q' };
    let bad = String::from_utf8(bad).unwrap();
    let bad_file = write_file(dir.path(), "bad.key", &bad);
    let e = fails(run_with(&["key", "show", "-"], &bad, &[]), 1);
    assert!(e.contains("invalid"), "{e}");
    let e = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "a",
            "1",
            "--key-file",
            bad_file.to_str().unwrap(),
        ]),
        1,
    );
    assert!(e.contains("invalid tree key"), "{e}");
    let e = fails(run_with(&["key", "show", "-"], "hello", &[]), 1);
    assert!(e.contains("not a whispeer key string"), "{e}");
    let (id, _, _) = keygen(dir.path(), "me.id");
    let e = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "a",
            "1",
            "--key-file",
            id.to_str().unwrap(),
        ]),
        1,
    );
    assert!(e.contains("wssec"), "{e}");

    // Bad JSON: as an argument, and on line 2 of stdin.
    let e = fails(
        run(&["pub", "--relay", &url, "a", "{nope", "--key-file", tf]),
        1,
    );
    assert!(e.contains("invalid JSON"), "{e}");
    let e = fails(
        run_with(
            &["pub", "--relay", &url, "a", "--key-file", tf],
            "1\n{\"unterminated\n",
            &[],
        ),
        1,
    );
    assert!(
        e.contains("stdin line 2") && e.contains("invalid JSON"),
        "{e}"
    );

    // A bad topic or filter.
    let e = fails(
        run(&["pub", "--relay", &url, "a/+/b", "1", "--key-file", tf]),
        1,
    );
    assert!(e.contains("wildcard"), "{e}");
    fails(run(&["sub", "--relay", &url, "a/#/b", "--key-file", tf]), 1);
    // Times too long for a deadline: a usage error, not a panic (exit 101).
    for args in [
        &[
            "sub",
            "--relay",
            &url,
            "a/#",
            "--key-file",
            tf,
            "--timeout",
            "1e19",
        ][..],
        &[
            "pub",
            "--relay",
            &url,
            "a",
            "1",
            "--key-file",
            tf,
            "--connect-timeout",
            "1e20",
        ][..],
    ] {
        let e = fails(run(args), 2);
        assert!(e.contains("too long"), "{e}");
    }

    // Inputs without end where a key, an invite or a dictionary is read (review of the
    // CLI, finding 6): refused once past the bound, not read until memory runs out.
    for args in [
        &["key", "show", "--key-file", "/dev/zero"][..],
        &["dict", "show", "/dev/zero"][..],
    ] {
        let e = fails(run(args), 1);
        assert!(e.contains("/dev/zero is larger than"), "{args:?}: {e}");
    }
    let zeros = "\0".repeat(5 << 20);
    let e = fails(run_with(&["key", "show", "-"], &zeros, &[]), 1);
    assert!(e.contains("stdin is larger than"), "{e}");
    let e = fails(
        run_with(
            &["invite", "open", "--identity", id.to_str().unwrap()],
            &zeros,
            &[],
        ),
        1,
    );
    assert!(e.contains("stdin is larger than"), "{e}");

    // A pub stdin line without end: refused past 64 MiB, not read until memory runs out.
    let endless = "7".repeat((64 << 20) + 2);
    let e = fails(
        run_with(
            &["pub", "--relay", &url, "a", "--key-file", tf],
            &endless,
            &[],
        ),
        1,
    );
    assert!(e.contains("stdin line 1 is longer than"), "{e}");

    // Bench numbers past what it can hold: usage errors, not a panic (capacity
    // overflow) or an abort on allocation (review of the CLI, finding 7).
    for (flag, value, says) in [
        (
            "--subs",
            "18446744073709551615",
            "--pubs and --subs take at most",
        ),
        ("--pubs", "10001", "--pubs and --subs take at most"),
        ("--size", "1099511627776", "--size takes at most"),
    ] {
        let e = fails(
            run(&["bench", "--relay", "tcp://127.0.0.1:1", flag, value]),
            2,
        );
        assert!(e.contains(says), "{flag} {value}: {e}");
    }

    // Relays that are not there, or not URLs.
    let e = fails(
        run(&[
            "pub",
            "--relay",
            "tcp://127.0.0.1:1",
            "a",
            "1",
            "--key-file",
            tf,
        ]),
        1,
    );
    assert!(e.contains("cannot connect to tcp://127.0.0.1:1"), "{e}");
    let e = fails(
        run(&["sub", "--relay", "ws://127.0.0.1:1", "a", "--key-file", tf]),
        1,
    );
    assert!(e.contains("cannot connect"), "{e}");
    fails(
        run(&[
            "pub",
            "--relay",
            "127.0.0.1:7480",
            "a",
            "1",
            "--key-file",
            tf,
        ]),
        2,
    );
    fails(
        run(&["pub", "--relay", "http://x:1", "a", "1", "--key-file", tf]),
        1,
    );

    // Missing keys, identities and arguments are usage errors.
    let e = fails(run(&["pub", "--relay", &url, "a", "1"]), 2);
    assert!(e.contains("no key given"), "{e}");
    fails(run(&["sub", "a", "--key-file", tf]), 2);
    fails(run(&["id"]), 2);
    fails(run(&["frobnicate"]), 2);
    let e = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "a",
            "1",
            "--key-file",
            "/nonexistent/k",
        ]),
        1,
    );
    assert!(e.contains("/nonexistent/k"), "{e}");
}

#[test]
fn bench_json_reports_every_message_delivered() {
    let relay = start_relay_binary(&[]);
    for (url, pubs, subs) in [(relay.ws_url(), "1", "1"), (relay.tcp_url(), "2", "2")] {
        let out = ok(run(&[
            "bench",
            "--relay",
            &url,
            "--msgs",
            "2000",
            "--pubs",
            pubs,
            "--subs",
            subs,
            "--size",
            "256",
            "--json",
            "--no-progress",
        ]));
        assert_eq!(out.lines().count(), 1, "{out}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        let subs: u64 = subs.parse().unwrap();
        assert_eq!(r["pubs"], pubs.parse::<u64>().unwrap());
        assert_eq!(r["subs"], subs);
        assert_eq!(r["size"], 256);
        // The default window: 1 MiB of payloads.
        assert_eq!(r["window"], 4096);
        assert_eq!(r["sent"], 2000);
        assert_eq!(r["received"].as_u64().unwrap(), 2000 * subs, "{out}");
        assert_eq!(r["lost"], 0);
        for k in ["duration_s", "publish_rate", "delivery_rate"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {out}");
        }
        let lat = &r["latency_us"];
        let p: Vec<u64> = ["p50", "p90", "p99", "p999", "max"]
            .iter()
            .map(|k| lat[*k].as_u64().unwrap_or_else(|| panic!("{k} in {out}")))
            .collect();
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "{out}");
        assert!(p[0] > 0);
        assert!(
            r.get("server_cpu_s").is_none(),
            "only with --relay-pid: {out}"
        );
        // The pipeline limit: seal and open measured alone; no relay term without its pid.
        let pl = &r["pipeline"];
        for k in ["seal_us", "open_us", "limit_per_s", "reached"] {
            assert!(pl[k].as_f64().unwrap() > 0.0, "pipeline {k} in {out}");
        }
        assert!(pl["cores"].as_u64().unwrap() >= 1, "{out}");
        assert!(pl.get("relay_us").is_none(), "{out}");
        // With every core busy too (on more than one core): its own costs and limit.
        if pl["cores"].as_u64().unwrap() > 1 {
            let busy = &pl["busy"];
            for k in ["seal_us", "open_us", "limit_per_s", "reached"] {
                assert!(
                    busy[k].as_f64().unwrap() > 0.0,
                    "pipeline busy {k} in {out}"
                );
            }
            let (seal, open) = (
                busy["seal_us"].as_f64().unwrap(),
                busy["open_us"].as_f64().unwrap(),
            );
            let limit = busy["limit_per_s"].as_f64().unwrap();
            let cores = pl["cores"].as_f64().unwrap();
            let per = seal / r["subs"].as_f64().unwrap() + open;
            assert!(
                (limit - cores * 1e6 / per).abs() <= 1.0 + limit * 0.01,
                "{out}"
            );
        } else {
            assert!(pl.get("busy").is_none(), "{out}");
        }
        // Per core used: the bench's CPU over the run (no relay term without its pid).
        let cores = r["cores_used"].as_f64().unwrap();
        let cpu = r["cpu_s"].as_f64().unwrap() / r["duration_s"].as_f64().unwrap();
        assert!((cores - cpu).abs() <= 0.01 + cpu * 0.01, "{out}");
        if cores > 0.0 {
            let per = r["delivery_rate"].as_f64().unwrap() / cores;
            let got = r["delivery_rate_per_core"].as_f64().unwrap();
            assert!((got - per).abs() <= 1.0 + per * 0.01, "{out}");
        }
    }
    // Human output without --json; --relay-pid adds the relay's CPU from /proc.
    let pid = relay.child.id().to_string();
    let out = ok(run(&[
        "bench",
        "--relay",
        &relay.ws_url(),
        "--msgs",
        "100",
        "--no-progress",
        "--relay-pid",
        &pid,
    ]));
    assert!(out.contains("msgs/s") && out.contains("p99"), "{out}");
    assert!(
        out.contains("cpu:       relay ") && out.contains("per delivered message: relay "),
        "{out}"
    );
    assert!(
        out.contains("pipeline:  seal ") && out.contains(" + relay ") && out.contains("limit "),
        "{out}"
    );
    assert!(
        out.contains("deliveries/s per core used") && out.contains("the bench and the relay"),
        "{out}"
    );
    let out = ok(run(&[
        "bench",
        "--relay",
        &relay.tcp_url(),
        "--msgs",
        "200",
        "--json",
        "--no-progress",
        "--relay-pid",
        &pid,
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["server_cpu_s"].as_f64().unwrap() >= 0.0, "{out}");
    // With the relay's pid its CPU counts in the cores used.
    let with_relay = (r["cpu_s"].as_f64().unwrap() + r["server_cpu_s"].as_f64().unwrap())
        / r["duration_s"].as_f64().unwrap();
    let cores = r["cores_used"].as_f64().unwrap();
    assert!(
        (cores - with_relay).abs() <= 0.01 + with_relay * 0.01,
        "{out}"
    );
    assert!(r["pipeline"]["relay_us"].as_f64().unwrap() >= 0.0, "{out}");
    fails(
        run(&["bench", "--relay", &relay.ws_url(), "--size", "8"]),
        2,
    );
}

/// `WHISPEER_BENCH_TRACE`: the trace is written with mode 0600, and a symbolic link planted
/// at its path is replaced, never followed (review F10).
#[cfg(unix)]
#[test]
fn bench_trace_is_private_and_never_follows_a_symlink() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let victim = write_file(dir.path(), "victim", "precious\n");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let trace = dir.path().join("trace");
    let file = dir.path().join("trace.0");
    std::os::unix::fs::symlink(&victim, &file).unwrap();
    ok(run_with(
        &[
            "bench",
            "--relay",
            &relay.ws_url(),
            "--msgs",
            "50",
            "--json",
            "--no-progress",
        ],
        "",
        &[("WHISPEER_BENCH_TRACE", trace.to_str().unwrap())],
    ));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file(), "the link was replaced");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 50, "{text}");
}

/// `bench --sub-process`: the subscribers run in a process of their own (issue 11's three
/// processes), with a key the bench made or one from a file; everything is still counted
/// and timed on one clock.
#[test]
fn bench_sub_process_runs_the_subscribers_in_a_process_of_their_own() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "bench");
    let tf = tree_file.to_str().unwrap();
    for (url, keys) in [
        (relay.tcp_url(), vec![]),
        (relay.ws_url(), vec!["--key-file", tf]),
    ] {
        let mut args = vec![
            "bench",
            "--relay",
            url.as_str(),
            "--msgs",
            "2000",
            "--subs",
            "2",
            "--size",
            "256",
            "--sub-process",
            "--json",
            "--no-progress",
        ];
        args.extend(keys);
        let out = ok(run(&args));
        assert_eq!(out.lines().count(), 1, "{out}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["sub_process"], true, "{out}");
        assert_eq!(r["sent"], 2000);
        assert_eq!(r["received"], 4000, "{out}");
        assert_eq!(r["lost"], 0);
        assert_eq!(r["rejected"], 0);
        // Measured by the subscriber process from its own /proc entry, and part of the total.
        let sub_cpu = r["sub_cpu_s"].as_f64().unwrap();
        assert!(
            sub_cpu > 0.0 && sub_cpu <= r["cpu_s"].as_f64().unwrap(),
            "{out}"
        );
        // The batch signatures were checked over there (one per batch, the rest cached).
        assert!(r["batch_root_hits"].as_u64().unwrap() > 0, "{out}");
        // Latency from two processes' clocks: ordered percentiles, none clamped to the
        // 1 µs floor a clock running ahead of the sender's would produce.
        let lat = &r["latency_us"];
        let p: Vec<u64> = ["p50", "p90", "p99", "max"]
            .iter()
            .map(|k| lat[*k].as_u64().unwrap())
            .collect();
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "{out}");
        assert!(p[0] > 1, "{out}");
    }
    let out = ok(run(&[
        "bench",
        "--relay",
        &relay.tcp_url(),
        "--msgs",
        "100",
        "--sub-process",
        "--no-progress",
    ]));
    assert!(out.contains("subscriber process"), "{out}");
    assert!(out.contains("delivered: 100 msgs"), "{out}");
}

/// A single nats-server on a random loopback port (`-p -1`), ready once its log names the
/// port it listens on. `None` when nats-server is not installed (`.ci/run` installs it).
struct NatsServer {
    child: Child,
    url: String,
}

impl NatsServer {
    fn start() -> Option<Self> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + TIMEOUT;
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("nats-server did not start");
            // "Listening for client connections on 127.0.0.1:PORT"
            if let Some(addr) = line.split("client connections on ").nth(1) {
                break format!("nats://{}", addr.trim());
            }
        };
        Some(Self { child, url })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bench --nats URL`: the same load through a real nats-server in the same run, reported
/// beside whispeer's with the ratio; the whispeer fields keep their shape.
#[test]
fn bench_runs_the_same_load_through_nats_and_prints_the_ratio() {
    let Some(nats) = NatsServer::start() else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let relay = start_relay_binary(&[]);
    let tcp = relay.tcp_url();
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--relay", tcp.as_str(), "--no-progress"];
        args.extend_from_slice(extra);
        run(&args)
    };
    let out = ok(bench(&[
        "--nats", &nats.url, "--msgs", "1000", "--subs", "2", "--size", "256", "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["received"], 2000, "{out}");
    assert_eq!(r["signing"], "batch");
    let n = &r["nats"];
    assert_eq!(n["sent"], 1000, "{out}");
    assert_eq!(n["received"], 2000, "{out}");
    assert_eq!(n["lost"], 0);
    assert_eq!(n["size"], 256);
    assert_eq!(n["signing"], "plaintext");
    assert_eq!(n["relay"], nats.url.as_str());
    assert!(n["latency_us"]["p50"].as_u64().unwrap() > 0, "{out}");
    let ratio = r["nats_ratio"]["delivery_rate"].as_f64().unwrap();
    let expect = r["delivery_rate"].as_f64().unwrap() / n["delivery_rate"].as_f64().unwrap();
    assert!((ratio - expect).abs() <= 0.001 + expect * 0.01, "{out}");
    // With the subscribers in a process of their own, for both.
    let out = ok(bench(&[
        "--nats",
        &nats.url,
        "--msgs",
        "500",
        "--subs",
        "2",
        "--sub-process",
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["received"], 1000, "{out}");
    assert_eq!(r["nats"]["received"], 1000, "{out}");
    assert_eq!(r["nats"]["sub_process"], true, "{out}");
    // (Present; a run this short may take less than /proc's 10 ms tick.)
    assert!(r["nats"]["sub_cpu_s"].as_f64().unwrap() >= 0.0, "{out}");
    // Without --nats there is no NATS part.
    let out = ok(bench(&["--msgs", "10", "--json"]));
    assert!(!out.contains("\"nats\""), "{out}");
    // Human output: NATS beside whispeer, with the ratio.
    let out = ok(bench(&["--nats", &nats.url, "--msgs", "200"]));
    assert!(
        out.contains("nats (plaintext") && out.contains("whispeer/nats:"),
        "{out}"
    );
    // A URL that is not NATS is a usage error; an unreachable server a runtime one.
    fails(bench(&["--nats", "ws://127.0.0.1:1"]), 2);
    let e = fails(
        bench(&[
            "--msgs",
            "10",
            "--nats",
            "nats://127.0.0.1:1",
            "--connect-timeout",
            "2",
        ]),
        1,
    );
    assert!(e.contains("nats://127.0.0.1:1"), "{e}");
}

/// `sub --durable NAME --qos 1`: a subscriber process killed (SIGKILL) mid-stream resumes
/// from its durable position; `--from`, `--last` and `--since` replay the relay's history.
#[test]
fn a_killed_durable_subscriber_resumes_and_history_replays() {
    let relay = start_relay_binary(&[]); // the binary keeps messages in SQLite by default
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "jobs");
    let tf = tree_file.to_str().unwrap();
    let url = relay.tcp_url();
    let publish = |values: std::ops::Range<u32>| {
        let lines: String = values.map(|i| format!("{i}\n")).collect();
        ok(run_with(
            &[
                "pub",
                "--relay",
                &url,
                "jobs/build",
                "--qos",
                "1",
                "--key-file",
                tf,
            ],
            &lines,
            &[],
        ));
    };
    // `whispeer sub` of the durable subscription "builder", with `extra` flags.
    let durable_args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = ["sub", "--relay", &url, "jobs/#", "--durable", "builder"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--qos", "1", "--key-file", tf].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let durable_sub = || {
        let args = durable_args(&[]);
        let mut p = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        p.ready();
        p
    };
    let value = |line: String| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["data"].as_u64().unwrap()
    };

    // First run: creates the durable subscription, sees 0..5, then dies without warning.
    let mut first = durable_sub();
    publish(0..10);
    let seen: Vec<u64> = (0..5).map(|_| value(first.line())).collect();
    assert_eq!(seen, [0, 1, 2, 3, 4]);
    // It prints a message, then acknowledges it: a kill right after a line was printed
    // may beat its ack (the message then comes again: at least once). Killed once the
    // relay has every ack — all 10 were stored and routed before `pub` returned — so the
    // resume point is known: after all it printed. (A slow retained hand-over hands the
    // ten over in one burst, and a kill after the fifth line beat every ack.)
    relay.wait_metric("whispeer_relay_unacked_bytes", |b| b == 0);
    first.child.kill().unwrap(); // SIGKILL: no goodbye
    first.child.wait().unwrap();
    // Everything it printed before it died (it may have got further than we read).
    let printed = 5 + first.out.iter().count() as u64;
    publish(10..12);

    // Second run resumes after the last acknowledged message: no gap, never from scratch.
    let mut second = durable_sub();
    let resumed_at = value(second.line());
    assert_eq!(
        resumed_at, printed,
        "the first run printed and acknowledged 0..{printed}"
    );
    let mut next = resumed_at;
    while next < 11 {
        let v = value(second.line());
        assert_eq!(v, next + 1, "in order, no gap, no duplicate");
        next = v;
    }
    drop(second);

    // History: from a sequence, the last N, and since a time.
    let seq_of_first = {
        let mut p = Proc::spawn(
            &[
                "sub",
                "--relay",
                &url,
                "jobs/#",
                "--from",
                "0",
                "--count",
                "1",
                "--key-file",
                tf,
            ],
            &[],
        );
        let v: serde_json::Value = serde_json::from_str(&p.line()).unwrap();
        assert_eq!(v["data"], 0);
        v["seq"].as_u64().unwrap()
    };
    let from = format!("{}", seq_of_first + 10);
    let out = ok(run(&[
        "sub",
        "--relay",
        &url,
        "jobs/#",
        "--from",
        &from,
        "--count",
        "2",
        "--key-file",
        tf,
    ]));
    let got: Vec<u64> = out.lines().map(|l| value(l.to_owned())).collect();
    assert_eq!(got, [10, 11]);
    let out = ok(run(&[
        "sub",
        "--relay",
        &url,
        "jobs/#",
        "--last",
        "3",
        "--count",
        "3",
        "--key-file",
        tf,
    ]));
    let got: Vec<u64> = out.lines().map(|l| value(l.to_owned())).collect();
    assert_eq!(got, [9, 10, 11]);
    let out = ok(run(&[
        "sub",
        "--relay",
        &url,
        "jobs/#",
        "--since",
        "1h",
        "--count",
        "12",
        "--key-file",
        tf,
    ]));
    assert_eq!(out.lines().count(), 12);
    fails(
        run(&[
            "sub",
            "--relay",
            &url,
            "jobs/#",
            "--since",
            "soon",
            "--key-file",
            tf,
        ]),
        1,
    );

    // `--delete`: the durable goes (with what it kept); the name starts afresh after it.
    publish(12..14);
    let out = run(&durable_args(&["--delete"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deleted: durable subscription 'builder'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut fresh = durable_sub();
    publish(14..15);
    assert_eq!(
        value(fresh.line()),
        14,
        "a new durable: nothing it kept before the deletion"
    );
    drop(fresh);
}

/// Review finding 1: `sub --qos 1` acknowledged a message as it took it, before printing
/// it. `sub --durable jobs --qos 1 … | head -1`: the second message's line cannot be
/// written (the pipe is closed), so it must stay unacknowledged and the next `sub --durable
/// jobs` gets it — before, it was acknowledged and never printed by anyone.
#[test]
fn a_message_whose_line_was_not_written_is_not_acknowledged() {
    let relay = start_relay_binary(&[]); // a store: durables and QoS 1
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "jobs");
    let tf = tree_file.to_str().unwrap();
    let url = relay.tcp_url();
    let publish = |value: &str| {
        ok(run(&[
            "pub",
            "--relay",
            &url,
            "jobs/build",
            value,
            "--qos",
            "1",
            "--key-file",
            tf,
        ]))
    };
    let durable = [
        "sub",
        "--relay",
        url.as_str(),
        "jobs/#",
        "--durable",
        "jobs",
        "--qos",
        "1",
        "--key-file",
        tf,
    ];
    // `| head -1`: stdout is a pipe whose reader goes away after one line.
    let mut child = whispeer()
        .args(durable)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn whispeer");
    let err = lines_of(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        match err.recv_timeout(TIMEOUT) {
            Ok(l) if l.starts_with("ready:") => break,
            Ok(l) => seen.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("no ready line ({e:?}): {seen:?}");
            }
        }
    }
    publish("1");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send((line, out));
    });
    let (line, out) = rx.recv_timeout(TIMEOUT).expect("the first line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"], 1);
    drop(out); // the pipe's reader is gone: writing the next line fails (EPIPE)
    publish("2");
    // The sub ends when it cannot write message 2's line: its stderr closes as it exits.
    loop {
        match err.recv_timeout(TIMEOUT) {
            Ok(l) => seen.push(l),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("the sub did not exit: {seen:?}");
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {seen:?}");
    // The durable resumes after message 1 (printed, acknowledged): message 2 comes again.
    let mut again = durable.to_vec();
    again.extend(["--count", "1", "--timeout", "10"]);
    let line = ok(run(&again));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"], 2, "{line}");
}

/// Review finding 3: `pub` at QoS 0 exited 0 when its message was never sent — over the
/// relay's max_frame it is dropped when the connection takes it, after `publish` returned
/// (unsigned: silently; batch-signed: a warning). It must exit 1 and say so.
#[test]
fn pub_exits_1_when_a_qos_0_message_was_not_published() {
    let relay = start_relay_binary(&["--max-frame", "4096"]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap();
    let (identity, _, _) = keygen(dir.path(), "me.id");
    let url = relay.tcp_url();
    let big = format!("\"{}\"", "x".repeat(8000));
    let publish = |value: &str, extra: &[&str]| {
        let mut args = vec![
            "pub",
            "--relay",
            &url,
            "a/b",
            value,
            "--compress",
            "none",
            "--key-file",
            tf,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let signed = ["--identity", identity.to_str().unwrap()];
    for extra in [&[][..], &signed[..]] {
        let o = publish(&big, extra);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "{extra:?}: {err}");
        assert!(
            errors[0].starts_with("error: 1 of 1 messages were not published: "),
            "{extra:?}: {err}"
        );
        assert!(errors[0].contains("max_frame"), "{extra:?}: {err}");
        // A message that fits goes through as before.
        ok(publish("\"small\"", extra));
    }
}

#[test]
fn key_rotate_sets_the_cutoff_and_pub_tree_picks_among_two_trees() {
    let dir = tempfile::tempdir().unwrap();
    let (alpha_file, alpha) = new_tree(dir.path(), "alpha");
    let (beta_file, beta) = new_tree(dir.path(), "beta");
    let (af, bf) = (alpha_file.to_str().unwrap(), beta_file.to_str().unwrap());

    // key rotate: the next epoch, same tree id and admin, with the cutoff and end given.
    let next = ok(run_with(
        &[
            "key",
            "rotate",
            "-",
            "--cutoff",
            "1000",
            "--not-after",
            "4102444800000",
        ],
        &alpha,
        &[],
    ));
    let (old, new) = (show(&alpha), show(&next));
    assert_eq!(new["kind"], "tree");
    assert_eq!(new["tree_id"], old["tree_id"]);
    assert_eq!(new["admin"], old["admin"]);
    assert_eq!(new["epoch"], 1);
    assert_eq!(new["prev_cutoff_ms"], 1000);
    assert_eq!(new["not_after_ms"], 4102444800000u64);
    // Default cutoff: now.
    let before = whispeer::now_ms();
    let now_rotated = show(&ok(run_with(&["key", "rotate", "-"], &alpha, &[])));
    assert!(now_rotated["prev_cutoff_ms"].as_u64().unwrap() >= before);
    assert_eq!(now_rotated["not_after_ms"], serde_json::Value::Null);
    // Only the admin rotates; an end before the cutoff is a usage error.
    let grant = ok(run_with(
        &["key", "derive", "-", "--path", "a"],
        &alpha,
        &[],
    ));
    assert!(fails(run_with(&["key", "rotate", "-"], &grant, &[]), 2).contains("tree key"));
    fails(
        run_with(
            &[
                "key",
                "rotate",
                "-",
                "--cutoff",
                "5000",
                "--not-after",
                "10",
            ],
            &alpha,
            &[],
        ),
        2,
    );

    // pub --tree: with keys of two trees covering the topic, a plain pub names both trees;
    // naming one seals with it (a subscriber holding only that tree reads it).
    let relay = start_relay_binary(&[]);
    let url = relay.tcp_url();
    let (alpha_id, beta_id) = (
        old["tree_id"].as_str().unwrap().to_owned(),
        show(&beta)["tree_id"].as_str().unwrap().to_owned(),
    );
    let err = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "shared/x",
            "1",
            "--key-file",
            af,
            "--key-file",
            bf,
        ]),
        1,
    );
    assert!(err.contains(&alpha_id) && err.contains(&beta_id), "{err}");
    let mut sub = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "shared/#",
            "--count",
            "1",
            "--key-file",
            bf,
        ],
        &[],
    );
    sub.ready();
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "shared/x",
        "2",
        "--qos",
        "1",
        "--tree",
        &beta_id,
        "--key-file",
        af,
        "--key-file",
        bf,
    ]));
    let v: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(v["data"], 2);
    assert!(sub.finish().0.success());
    let err = fails(
        run(&[
            "pub",
            "--relay",
            &url,
            "shared/x",
            "3",
            "--tree",
            "xyz",
            "--key-file",
            af,
        ]),
        2,
    );
    assert!(err.contains("32 hex digits"), "{err}");

    // bench --tree: the same choice for the bench topic.
    let bench = |tree: Option<&str>| {
        let mut args = vec![
            "bench",
            "--relay",
            &url,
            "--msgs",
            "50",
            "--topic",
            "shared/b",
            "--json",
            "--no-progress",
            "--key-file",
            af,
            "--key-file",
            bf,
        ];
        if let Some(t) = tree {
            args.extend(["--tree", t]);
        }
        run(&args)
    };
    let err = fails(bench(None), 1);
    assert!(err.contains(&alpha_id) && err.contains(&beta_id), "{err}");
    let r: serde_json::Value = serde_json::from_str(&ok(bench(Some(&alpha_id)))).unwrap();
    assert_eq!(
        (r["sent"].as_u64(), r["lost"].as_u64()),
        (Some(50), Some(0))
    );
}

#[test]
fn sub_lines_show_tree_epoch_and_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let (_, alpha) = new_tree(dir.path(), "alpha");
    let (beta_file, beta) = new_tree(dir.path(), "beta");
    // Alpha in its next epoch: lines report the epoch that sealed, not a constant.
    let rotated = ok(run_with(&["key", "rotate", "-"], &alpha, &[]));
    let rotated_file = write_file(dir.path(), "alpha1.key", &rotated);
    let (rf, bf) = (rotated_file.to_str().unwrap(), beta_file.to_str().unwrap());
    let (a, b) = (show(&rotated), show(&beta));
    assert_eq!(a["epoch"], 1);
    // A grant for one topic narrowed by `me` from an admin-signed subtree grant: whoever
    // holds only it cannot check it (delegated).
    let team = ok(run_with(
        &["key", "derive", "-", "--path", "team"],
        &rotated,
        &[],
    ));
    let (me_file, _, me_sender) = keygen(dir.path(), "me.id");
    let news = ok(run_with(
        &[
            "key",
            "derive",
            "-",
            "--topic",
            "team/news",
            "--identity",
            me_file.to_str().unwrap(),
        ],
        &team,
        &[],
    ));
    let news_file = write_file(dir.path(), "news.key", &news);

    let relay = start_relay_binary(&[]);
    let url = relay.ws_url();
    // A subscription gets one tree's messages: with keys of both, each names its tree.
    let tree_sub = |count: &str, tree: &str| {
        let mut p = Proc::spawn(
            &[
                "sub",
                "--relay",
                &url,
                "#",
                "--count",
                count,
                "--tree",
                tree,
                "--key-file",
                rf,
                "--key-file",
                bf,
            ],
            &[],
        );
        p.ready();
        p
    };
    let (alpha_id, beta_id) = (
        a["tree_id"].as_str().unwrap(),
        b["tree_id"].as_str().unwrap(),
    );
    let mut in_beta = tree_sub("1", beta_id);
    let mut in_alpha = tree_sub("2", alpha_id);
    let mut delegated = sub_ready(&url, "team/news", 1, &[news_file.to_str().unwrap()]);
    let publish = |topic: &str, value: &str, tree: &str| {
        ok(run(&[
            "pub",
            "--relay",
            &url,
            topic,
            value,
            "--qos",
            "1",
            "--tree",
            tree,
            "--key-file",
            rf,
            "--key-file",
            bf,
        ]));
    };
    publish("shared/x", "1", beta_id);
    publish("shared/x", "2", alpha_id);
    publish("team/news", "3", alpha_id);

    let admin_signed = serde_json::json!({"kind": "admin-signed"});
    let lines: Vec<serde_json::Value> = [in_beta.line(), in_alpha.line(), in_alpha.line()]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["data"].clone(),
                l["tree"].clone(),
                l["epoch"].clone(),
                l["provenance"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                1.into(),
                b["tree_id"].clone(),
                0.into(),
                admin_signed.clone()
            ),
            (
                2.into(),
                a["tree_id"].clone(),
                1.into(),
                admin_signed.clone()
            ),
            (3.into(), a["tree_id"].clone(), 1.into(), admin_signed),
        ]
    );
    let l: serde_json::Value = serde_json::from_str(&delegated.line()).unwrap();
    assert_eq!(l["data"], 3);
    assert_eq!(l["tree"], a["tree_id"]);
    assert_eq!(l["epoch"], 1);
    assert_eq!(
        l["provenance"],
        serde_json::json!({"kind": "delegated", "by": me_sender})
    );
    for p in [in_beta, in_alpha, delegated] {
        let (status, rest, _) = p.finish();
        assert!(status.success());
        assert!(rest.is_empty());
    }
}

/// `--relay A,B`: the subscriber starts on A, moves to B when A is killed (a `relay: now
/// on` line on stderr) and goes on; a publisher given `--relay dead,alive` skips the dead
/// one.
#[test]
fn relay_list_fails_over_to_the_next_relay() {
    let mut a = start_relay_binary(&[]);
    let b = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "home");
    let key = tree_file.to_str().unwrap();
    let subs = format!("{},{}", a.ws_url(), b.tcp_url());
    let mut sub = sub_ready(&subs, "sensor/#", 2, &[key]);
    let pubs = format!("{},{}", a.tcp_url(), b.ws_url());
    ok(run(&[
        "pub",
        "--relay",
        &pubs,
        "sensor/t",
        "1",
        "--key-file",
        key,
    ]));
    let line: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(line["data"], 1);

    a.child.kill().unwrap(); // SIGKILL
    a.child.wait().unwrap();
    let moved = format!("relay: now on {}", b.tcp_url());
    loop {
        match sub.err.recv_timeout(TIMEOUT) {
            Ok(l) if l == moved => break,
            Ok(l) => sub.err_seen.push(l),
            Err(e) => panic!("no failover line ({e:?}); stderr: {:?}", sub.err_seen),
        }
    }
    // A is dead now: `--relay dead,alive`.
    ok(run(&[
        "pub",
        "--relay",
        &pubs,
        "sensor/t",
        "2",
        "--key-file",
        key,
    ]));
    let line: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(line["data"], 2);
    let (status, rest, _) = sub.finish();
    assert!(status.success());
    assert!(rest.is_empty());

    // Every relay dead: one error naming the last one tried.
    drop(b);
    let e = fails(
        run(&["pub", "--relay", &pubs, "sensor/t", "3", "--key-file", key]),
        1,
    );
    assert!(e.contains("cannot connect to"), "{e}");
}

/// `dict train` from JSON lines, `dict show`/`export`, then `pub --dict`: a subscriber
/// holding the dictionary (a `wsdict1…` line in a key file) reads the message; one without
/// it is told which dictionary it lacks (the body opened and verified; only that is
/// reported).
#[test]
fn dict_train_share_and_publish_with_a_dictionary() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    telemetry_samples(dir.path());
    let trained: serde_json::Value = serde_json::from_str(&ok(run(&[
        "dict",
        "train",
        "--samples",
        &path("samples.jsonl"),
        "--lines",
        "--size",
        "4096",
        "-o",
        &path("dict.bin"),
    ])))
    .unwrap();
    let id = trained["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(trained["zstd_format"], true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path("dict.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Refuses to overwrite; show and export agree on the id.
    fails(
        run(&[
            "dict",
            "train",
            "--samples",
            &path("samples.jsonl"),
            "--lines",
            "-o",
            &path("dict.bin"),
        ]),
        1,
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(run(&["dict", "show", "--json", &path("dict.bin")]))).unwrap();
    assert_eq!(shown["id"], trained["id"]);
    ok(run(&[
        "dict",
        "export",
        &path("dict.bin"),
        "--out",
        &path("dict.key"),
    ]));
    let exported = std::fs::read_to_string(path("dict.key")).unwrap();
    assert!(exported.starts_with("wsdict1"));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(run(&["dict", "show", "--json", &path("dict.key")]))).unwrap();
    assert_eq!(shown["id"], trained["id"]);

    // Usage errors: --dict with another codec; too few samples; a file too large.
    let (tree_file, _) = new_tree(dir.path(), "tele");
    let tf = tree_file.to_str().unwrap();
    let e = fails(
        run(&[
            "pub",
            "--relay",
            "ws://127.0.0.1:1",
            "a/b",
            "1",
            "--key-file",
            tf,
            "--dict",
            &path("dict.bin"),
            "--compress",
            "lz4",
        ]),
        2,
    );
    assert!(e.contains("--dict"), "{e}");
    write_file(dir.path(), "two.jsonl", "{\"a\":1}\n{\"a\":2}\n");
    fails(
        run(&[
            "dict",
            "train",
            "--samples",
            &path("two.jsonl"),
            "--lines",
            "-o",
            &path("x.bin"),
        ]),
        2,
    );
    std::fs::write(path("big.bin"), vec![b'x'; 112 * 1024 + 1]).unwrap();
    let e = fails(run(&["dict", "show", &path("big.bin")]), 1);
    assert!(e.contains("exceeds the limit"), "{e}");

    let relay = start_relay_binary(&[]);
    let url = relay.ws_url();
    let mut with = sub_ready(&url, "tele/#", 1, &[tf, &path("dict.key")]);
    let mut without = sub_ready(&url, "tele/#", 1, &[tf]);
    pub_reading_with_dict(&url, tf, &path("dict.bin"), "21.5");
    let l: serde_json::Value = serde_json::from_str(&with.line()).unwrap();
    assert_eq!(l["topic"], "tele/kitchen");
    assert_eq!(l["data"]["celsius"], 21.5);
    let (status, _, _) = with.finish();
    assert!(status.success());
    // The other subscriber logs the dictionary it lacks (and delivers nothing).
    without.missing_dictionary(&id);
    assert!(
        without.out.try_recv().is_err(),
        "nothing delivered without the dictionary"
    );
}

/// `--auth-token TOKEN` on the command line (visible in `ps` and shell history) works as
/// before but prints a one-line warning naming `WHISPEER_AUTH_TOKEN`; the token itself is
/// never repeated. From the variable: no warning.
#[test]
fn auth_token_on_the_command_line_is_warned_about() {
    let token = "wsp_tok_secret-token-on-argv";
    let warned = |o: &Output| -> Vec<String> {
        let err = stderr(o);
        assert!(!err.contains(token), "token echoed: {err}");
        err.lines()
            .filter(|l| l.starts_with("warning:") && l.contains("--auth-token"))
            .map(str::to_owned)
            .collect()
    };
    // No key: a usage error before any connection, the warning first.
    for cmd in ["pub", "sub"] {
        let args = [
            cmd,
            "--relay",
            "ws://127.0.0.1:1",
            "a/b",
            "--auth-token",
            token,
        ];
        let o = run(&args);
        let w = warned(&o);
        assert_eq!(w.len(), 1, "{}", stderr(&o));
        assert!(w[0].contains("WHISPEER_AUTH_TOKEN"), "{}", w[0]);
        fails(o, 2);
        let o = run_with(&args[..4], "", &[("WHISPEER_AUTH_TOKEN", token)]);
        assert!(warned(&o).is_empty(), "{}", stderr(&o));
        fails(o, 2);
    }
    let o = run(&[
        "bench",
        "--relay",
        "ws://127.0.0.1:1",
        "--pubs",
        "0",
        "--auth-token",
        token,
    ]);
    assert_eq!(warned(&o).len(), 1, "{}", stderr(&o));
    fails(o, 2);
}

/// A relay with `auth = required` and a bearer-token account (group `home`): the relay and
/// the token.
fn relay_with_token_account() -> (RelayProcess, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    let token = support::account_add(&accounts, "svc", &["--token", "--group", "home"])
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let relay = start_relay_binary(&[
        "--auth",
        "required",
        "--accounts",
        accounts.to_str().unwrap(),
    ]);
    (relay, dir, token)
}

/// The processes whose parent is `ppid`: (pid, command line arguments).
#[cfg(target_os = "linux")]
fn children_of(ppid: u32) -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // /proc/PID/stat: "PID (COMM) STATE PPID …"; COMM may hold spaces and ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(ppid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, args));
    }
    out
}

/// `bench --sub-process` against a relay that requires an account: the subscriber process
/// authenticates with the parent's token and holds its keys, but neither the token nor a
/// key string (nor the flags that carried them) is on its command line, which every user
/// can read in `/proc` (`ps`): both travel in its environment.
#[cfg(target_os = "linux")]
#[test]
fn bench_sub_process_gets_secrets_in_its_environment_never_its_argv() {
    let (relay, _accounts, token) = relay_with_token_account();
    let key = ok(run(&["key", "new", "--tree", "bench"]));
    let url = relay.tcp_url();
    let mut p = Proc::spawn(
        &[
            "bench",
            "--relay",
            &url,
            "--msgs",
            "3000",
            "--rate",
            "1000",
            "--size",
            "64",
            "--sub-process",
            "--json",
            "--no-progress",
            "--auth-token",
            &token,
            "--key",
            &key,
        ],
        &[],
    );
    let parent = p.child.id();
    let start = Instant::now();
    let (child, args) = loop {
        let found = children_of(parent)
            .into_iter()
            .find(|(_, a)| a.iter().any(|x| x == "--subscriber-child"));
        if let Some(c) = found {
            break c;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("bench exited ({status}) before its subscriber process was seen");
        }
        assert!(start.elapsed() < TIMEOUT, "no subscriber process");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let line = args.join(" ");
    assert!(!line.contains(&token), "token on the child's argv: {line}");
    assert!(!line.contains(&key), "key on the child's argv: {line}");
    for flag in ["--auth-token", "--key", "--key-file", "--auth-key"] {
        assert!(
            !args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}="))),
            "{line}"
        );
    }
    // The other arguments are passed on.
    assert!(args.iter().any(|a| a == "--msgs"), "{line}");
    // What it got instead: its environment (readable only by this user).
    if let Ok(env) = std::fs::read(format!("/proc/{child}/environ")) {
        let env: Vec<String> = env
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert!(env.contains(&format!("WHISPEER_AUTH_TOKEN={token}")));
        assert!(env.contains(&format!("WHISPEER_KEY={key}")));
    }
    let (status, out, err) = p.finish();
    assert!(status.success(), "{err:?}");
    // The parent warned once about each secret on its own command line.
    assert_eq!(
        err.iter()
            .filter(|l| l.contains("--auth-token puts"))
            .count(),
        1,
        "{err:?}"
    );
    assert!(!err.iter().any(|l| l.contains(&token)), "{err:?}");
    let r: serde_json::Value = serde_json::from_str(&out.join("\n")).unwrap();
    assert_eq!(r["sub_process"], true, "{r}");
    assert_eq!(r["sent"], 3000);
    assert_eq!(r["received"], 3000, "{r}");
}

/// PROTOCOL §5.9 fixes a passphrase tree's Argon2id parameters (256 MiB, t = 2, p = 1; or the
/// version-1 64 MiB, t = 3, p = 1): anything else is a usage error, named in one line, before
/// any passphrase is read or Argon2 runs.
#[test]
fn from_passphrase_refuses_argon2_parameters_outside_the_spec() {
    let pass = [("WHISPEER_PASSPHRASE", "correct horse battery staple")];
    for extra in [
        &["--argon2-memory-kib", "8"][..],
        &["--argon2-memory-kib", "8", "--argon2-iterations", "1"],
        &["--argon2-iterations", "1"],
        &["--argon2-iterations", "100"],
        &["--argon2-lanes", "4"],
        &["--argon2-lanes", "0"],
        &["--argon2-memory-kib", "4194304"],
        &["--argon2-memory-kib", "65536"],
        &[
            "--argon2-memory-kib",
            "65536",
            "--argon2-iterations",
            "3",
            "--argon2-lanes",
            "2",
        ],
    ] {
        let mut args = vec!["key", "from-passphrase", "--tree", "family"];
        args.extend_from_slice(extra);
        let e = fails(run_with(&args, "", &pass), 2);
        assert!(
            e.contains("Argon2id") && e.contains("§5.9"),
            "{extra:?}: {e}"
        );
        assert!(!e.contains("correct horse"), "{e}");
    }
    // The version-1 parameters reproduce a version-1 tree: accepted.
    let v1 = ok(run_with(
        &[
            "key",
            "from-passphrase",
            "--tree",
            "family",
            "--argon2-memory-kib",
            "65536",
            "--argon2-iterations",
            "3",
        ],
        "",
        &pass,
    ));
    assert!(v1.starts_with("wstree1"), "{v1}");
}

#[cfg(unix)]
fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A key, identity or relay account key file that group or others may write is refused
/// (like ssh refuses such a private key), with one line naming the file and the fix; one
/// they may only read gets a warning, as before.
#[cfg(unix)]
#[test]
fn secret_files_writable_by_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (tree_file, _) = new_tree(dir.path(), "home");
    let tf = tree_file.to_str().unwrap();
    let (id_file, _, _) = keygen(dir.path(), "me.id");
    let idf = id_file.to_str().unwrap();
    let auth_file = dir.path().join("acct.key");
    ok(run(&["auth-keygen", "--out", auth_file.to_str().unwrap()]));
    let af = auth_file.to_str().unwrap();
    let refused = |o: Output, file: &str| {
        let e = fails(o, 1);
        assert!(e.contains(file), "{e}");
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(e.contains(&format!("chmod 600 {file}")), "{e}");
        assert!(!e.contains("wstree1") && !e.contains("wssec1"), "{e}");
    };
    for mode in [0o666, 0o620, 0o602] {
        chmod(&tree_file, mode);
        refused(run(&["key", "show", "--key-file", tf]), tf);
        refused(run_with(&["key", "show"], "", &[("WHISPEER_KEY", tf)]), tf);
        chmod(&tree_file, 0o600);

        chmod(&id_file, mode);
        refused(run(&["id", "--identity", idf]), idf);
        refused(run_with(&["id"], "", &[("WHISPEER_IDENTITY", idf)]), idf);
        chmod(&id_file, 0o600);

        // Refused before any connection is tried.
        chmod(&auth_file, mode);
        let pub_args = [
            "pub",
            "--relay",
            "tcp://127.0.0.1:1",
            "a/b",
            "1",
            "--key-file",
            tf,
        ];
        let mut args = pub_args.to_vec();
        args.extend(["--auth-key", af]);
        refused(run(&args), af);
        refused(run_with(&pub_args, "", &[("WHISPEER_AUTH_KEY", af)]), af);
        chmod(&auth_file, 0o600);
    }
    // Readable by others: a warning, and it works. Private: silent.
    chmod(&tree_file, 0o644);
    let o = run(&["key", "show", "--key-file", tf]);
    assert!(
        stderr(&o).contains("accessible by others"),
        "{}",
        stderr(&o)
    );
    ok(o);
    chmod(&tree_file, 0o600);
    let o = run(&["key", "show", "--key-file", tf]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    ok(o);
    // A path that needs quoting is quoted in the fix.
    let odd = dir.path().join("my key's file");
    std::fs::copy(&tree_file, &odd).unwrap();
    chmod(&odd, 0o664);
    let e = fails(
        run(&["key", "show", "--key-file", odd.to_str().unwrap()]),
        1,
    );
    assert!(e.contains("chmod 600 '"), "{e}");
    assert!(e.contains("my key'\\''s file'"), "{e}");

    // Owned by another user (mode 0600 or 0644): refused, whatever its mode — its owner can
    // always rewrite it (review of the CLI, finding 5). Needs root to give a file away.
    if rustix::process::geteuid().is_root() {
        let planted = dir.path().join("planted.key");
        std::fs::copy(&tree_file, &planted).unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        for mode in [0o600, 0o644] {
            chmod(&planted, mode);
            let e = fails(
                run(&["key", "show", "--key-file", planted.to_str().unwrap()]),
                1,
            );
            assert!(e.contains("belongs to another user (uid 65534"), "{e}");
            assert!(!e.contains("wstree1"), "{e}");
        }
    }
}

/// A FIFO at `path` (mode 0600) that a thread fills with `text` once, when it is opened
/// for reading — like `<(cat FILE)`. A second open for reading would wait forever.
#[cfg(unix)]
fn fifo_with(path: &Path, text: String) {
    let st = Command::new("mkfifo")
        .args(["-m", "600"])
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    let p = path.to_owned();
    std::thread::spawn(move || {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&p) {
            let _ = f.write_all(text.as_bytes());
        }
    });
}

/// Each secret file is read exactly once, so a FIFO (process substitution, `/dev/fd/N`)
/// works as a key or identity file: `sub` asks for its keys three times (keys,
/// dictionaries, durable owner) and `pub` twice, yet each FIFO is opened once; a path in
/// `WHISPEER_KEY` may name one too.
#[cfg(unix)]
#[test]
fn secret_files_are_read_once_so_a_fifo_works() {
    let dir = tempfile::tempdir().unwrap();
    let key = ok(run(&["key", "new", "--tree", "home"]));
    let id = ok(run(&["keygen"]));
    let fifo = |name: &str, text: &str| {
        let p = dir.path().join(name);
        fifo_with(&p, format!("# a comment\n{text}\n"));
        p.to_str().unwrap().to_owned()
    };
    let d = show(&key);
    let k1 = fifo("k1", &key);
    let o = run(&["key", "show", "--json", "--key-file", &k1]);
    let shown: serde_json::Value = serde_json::from_str(&ok(o)).unwrap();
    assert_eq!(shown["key_id"], d["key_id"]);
    let k2 = fifo("k2", &key);
    let o = run_with(&["key", "show", "--json"], "", &[("WHISPEER_KEY", &k2)]);
    let shown: serde_json::Value = serde_json::from_str(&ok(o)).unwrap();
    assert_eq!(shown["key_id"], d["key_id"]);
    let i1 = fifo("i1", &id);
    assert!(ok(run(&["id", "--identity", &i1])).contains("public id: wsid1"));

    let relay = start_relay_binary(&[]);
    let url = relay.ws_url();
    let (ks, kp, ip) = (fifo("ks", &key), fifo("kp", &key), fifo("ip", &id));
    let mut sub = Proc::spawn(
        &[
            "sub",
            "--relay",
            &url,
            "a/#",
            "--count",
            "1",
            "--key-file",
            &ks,
        ],
        &[],
    );
    sub.ready();
    ok(run(&[
        "pub",
        "--relay",
        &url,
        "a/b",
        "42",
        "--key-file",
        &kp,
        "--identity",
        &ip,
        "--qos",
        "1",
    ]));
    let l: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(l["data"], 42);
    assert!(l["sender"].as_str().unwrap().starts_with("wspk1"), "{l}");
    let (status, _, _) = sub.finish();
    assert!(status.success());
}

/// Whether `strace` runs here (ptrace may be denied in a container).
#[cfg(target_os = "linux")]
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Secret files are written safely: `dict train -o` never follows a symbolic link at its
/// output or overwrites a file without `--force` (O_EXCL), `--force` replaces the file with a
/// new one of mode 0600 (before, the old file's mode stayed), no temporary file is left
/// behind, and (where strace runs) the file and then its directory are fsynced.
#[cfg(unix)]
#[test]
fn secret_files_are_written_exclusively_and_synced() {
    let dir = tempfile::tempdir().unwrap();
    let samples = telemetry_samples(dir.path());
    let sp = samples.to_str().unwrap().to_owned();
    // `dict train` up to its `-o` (the output path follows).
    let train_args = [
        "dict",
        "train",
        "--samples",
        &sp,
        "--lines",
        "--size",
        "4096",
        "-o",
    ];
    let train = |out: &Path, force: bool| {
        let mut args = train_args.to_vec();
        let out = out.to_str().unwrap().to_owned();
        args.push(&out);
        if force {
            args.push("--force");
        }
        run(&args)
    };
    // A dangling symbolic link at the output: refused, its target never created.
    let target = dir.path().join("elsewhere.bin");
    let link = dir.path().join("link.bin");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = fails(train(&link, false), 1);
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert!(!target.exists(), "the link was followed");
    // The same for the other secret files.
    let e = fails(run(&["keygen", "--out", link.to_str().unwrap()]), 1);
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert!(!target.exists(), "the link was followed");

    // --force replaces an existing file (here one others may read) by a private one.
    let out = dir.path().join("dict.bin");
    std::fs::write(&out, b"old").unwrap();
    chmod(&out, 0o644);
    let e = fails(train(&out, false), 1);
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    ok(train(&out, true));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert_ne!(std::fs::read(&out).unwrap(), b"old");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["dict.bin", "link.bin", "samples.jsonl"],
        "temporary files left"
    );

    #[cfg(target_os = "linux")]
    {
        if !strace_works() {
            eprintln!("strace is not available here: the fsync checks are skipped");
            return;
        }
        let sdir = tempfile::tempdir().unwrap();
        let sd = std::fs::canonicalize(sdir.path()).unwrap();
        let log = sd.join("strace.log");
        for (name, args) in [
            ("me.id", vec!["keygen", "--out"]),
            ("t.dict", train_args.to_vec()),
            ("acct.key", vec!["auth-keygen", "--out"]),
            ("t.key", vec!["key", "new", "--tree", "t", "--out"]),
        ] {
            let file = sd.join(name);
            let o = Command::new("strace")
                .args([
                    "-f",
                    "-y",
                    "-e",
                    "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat",
                    "-o",
                ])
                .arg(&log)
                .arg(env!("CARGO_BIN_EXE_whispeer"))
                .args(&args)
                .arg(&file)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
            let trace = std::fs::read_to_string(&log).unwrap();
            let calls: Vec<&str> = trace
                .lines()
                .filter(|l| l.contains("sync(") || l.contains("link") || l.contains("rename"))
                .collect();
            let dir_text = format!("<{}>", sd.display());
            let file_sync = calls
                .iter()
                .position(|l| l.contains("sync(") && l.contains(&format!(".{name}.")))
                .unwrap_or_else(|| panic!("{name}: the file was not fsynced: {calls:#?}"));
            let placed = calls
                .iter()
                .position(|l| (l.contains("link") || l.contains("rename")) && l.contains(name))
                .unwrap_or_else(|| panic!("{name}: not linked into place: {calls:#?}"));
            let dir_sync = calls
                .iter()
                .rposition(|l| l.contains("sync(") && l.contains(&dir_text))
                .unwrap_or_else(|| panic!("{name}: the directory was not fsynced: {calls:#?}"));
            assert!(
                file_sync < placed && placed < dir_sync,
                "{name}: order: {calls:#?}"
            );
            std::fs::remove_file(&log).unwrap();
        }
    }
}
