//! No import circles between the modules of the client crate (and of the `whispeer` CLI).
//!
//! Every file under `src/` is a module; module A depends on module B when A names a path
//! into B: a `use crate::…`, `use super::…` or `use self::…` (brace groups expanded), or such
//! a path written inline. A path through a re-export (`crate::Client`, `pub use` in a
//! parent) counts as a dependency on the module that defines the item. A parent naming its
//! own children (`mod x; pub use x::Y;`) is not an edge: that is its face, not a dependency.
//! Comment lines and `#[cfg(test)] mod …` blocks are left out. The test fails naming the
//! circle and the path that made each of its edges.

use std::collections::BTreeMap;
use std::path::Path;

type Mod = Vec<String>;

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The code of a file without comment lines and without `#[cfg(test)] mod` blocks.
fn code_of(src: &str) -> String {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            // Skip to the end of the module's braces.
            let mut depth = 0i32;
            let mut opened = false;
            i += 1;
            while i < lines.len() {
                for c in lines[i].chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                i += 1;
                if opened && depth <= 0 {
                    break;
                }
            }
            continue;
        }
        if !t.starts_with("//") {
            out.push_str(lines[i]);
            out.push('\n');
        }
        i += 1;
    }
    out
}

/// Expands a use tree (`a::{b, c::{d, e as f}}`) into paths (`a::b`, `a::c::d`, `a::c::e`).
fn expand(tree: &str) -> Vec<String> {
    fn split_top(s: &str) -> Vec<String> {
        let (mut parts, mut cur, mut depth) = (Vec::new(), String::new(), 0);
        for c in s.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        parts.push(cur);
        parts
    }
    fn rec(prefix: &str, s: &str, out: &mut Vec<String>) {
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            match (part.find('{'), part.rfind('}')) {
                (Some(i), Some(j)) if i < j => {
                    rec(&format!("{prefix}{}", &part[..i]), &part[i + 1..j], out)
                }
                _ => out.push(format!("{prefix}{part}")),
            }
        }
    }
    let flat: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    rec("", &flat, &mut out);
    out
}

/// The `use` statements of some code: `(is a re-export, path, the name it binds)`.
fn uses(code: &str) -> Vec<(bool, String, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = &rest[..i];
        let at_start = before
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || c == ';' || c == '{' || c == '}');
        let tail = &rest[i + 4..];
        let Some(end) = tail.find(';') else { break };
        // A use tree holds only path characters (not `use` in a string or a comment).
        let tree_like = tail[..end]
            .chars()
            .all(|c| c.is_alphanumeric() || " \n\t_:{},*".contains(c));
        if at_start && tree_like {
            // `pub use`, `pub(crate) use`, `pub(super) use`: a re-export.
            let b = before.trim_end();
            let public = b.ends_with("pub")
                || (b.ends_with(')')
                    && b.rsplit_once("pub(")
                        .is_some_and(|(_, r)| !r.contains([';', '{', '}'])));
            for p in expand(&tail[..end]) {
                let (path, alias) = match p.split_once(" as ") {
                    Some((p, a)) => (p.trim().to_owned(), a.trim().to_owned()),
                    None => {
                        let last = p.rsplit("::").next().unwrap_or("").to_owned();
                        (p.clone(), last)
                    }
                };
                out.push((public, path, alias));
            }
            rest = &tail[end..];
        } else {
            rest = tail;
        }
    }
    out
}

/// Paths written inline: `crate::x::Y`, `super::x`, `self::x`.
fn inline_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |n| at + n);
            out.push(code[at..end].trim_end_matches(':').to_owned());
        }
    }
    out
}

struct Graph {
    modules: BTreeMap<Mod, String>,
    /// `(module, name)` → the module that defines what `module` re-exports as `name`.
    reexports: BTreeMap<(Mod, String), Mod>,
}

impl Graph {
    fn new(modules: BTreeMap<Mod, String>) -> Self {
        let mut g = Graph {
            modules,
            reexports: BTreeMap::new(),
        };
        // Re-exports of re-exports: a few rounds reach the defining module.
        for _ in 0..4 {
            let mut found = BTreeMap::new();
            for (m, code) in &g.modules {
                for (public, path, alias) in uses(code) {
                    if let (true, Some(t)) = (public, g.resolve(m, &path)) {
                        found.insert((m.clone(), alias), t);
                    }
                }
            }
            g.reexports = found;
        }
        g
    }

    /// The module a path (seen in module `m`) leads into, if it is one of the crate's.
    fn resolve(&self, m: &Mod, path: &str) -> Option<Mod> {
        let segs: Vec<&str> = path.split("::").map(str::trim).collect();
        let (mut full, rest): (Mod, &[&str]) = match segs.first()? {
            &"crate" => (Vec::new(), &segs[1..]),
            &"super" | &"self" => {
                let mut base = m.clone();
                let mut k = 0;
                while let Some(s) = segs.get(k).filter(|s| **s == "super" || **s == "self") {
                    if *s == "super" {
                        base.pop();
                    }
                    k += 1;
                }
                (base, &segs[k..])
            }
            first => {
                // A relative path into a child module (`use outbox::Outbox`).
                let mut child = m.clone();
                child.push((*first).to_owned());
                if !self.modules.contains_key(&child) {
                    return None;
                }
                (m.clone(), &segs[..])
            }
        };
        full.extend(rest.iter().map(|s| (*s).to_owned()));
        for n in (0..=full.len()).rev() {
            let prefix = &full[..n];
            if self.modules.contains_key(prefix) {
                if let Some(t) = full
                    .get(n)
                    .and_then(|next| self.reexports.get(&(prefix.to_vec(), next.clone())))
                {
                    return Some(t.clone());
                }
                return Some(prefix.to_vec());
            }
        }
        None
    }

    /// Edges `from → to` with the path that made each.
    fn edges(&self) -> BTreeMap<Mod, BTreeMap<Mod, String>> {
        let mut edges: BTreeMap<Mod, BTreeMap<Mod, String>> = BTreeMap::new();
        for (m, code) in &self.modules {
            let mut paths: Vec<String> = uses(code).into_iter().map(|(_, p, _)| p).collect();
            paths.extend(inline_paths(code));
            let out = edges.entry(m.clone()).or_default();
            for p in paths {
                let Some(t) = self.resolve(m, &p) else {
                    continue;
                };
                // Itself, or its own children: not a dependency.
                if t.starts_with(m) {
                    continue;
                }
                out.entry(t).or_insert(p);
            }
        }
        edges
    }

    /// The first import circle found, as `a → b (path) → … → a`.
    fn circle(&self) -> Option<String> {
        let edges = self.edges();
        let mut state: BTreeMap<&Mod, u8> = BTreeMap::new(); // 1 on the stack, 2 done
        let mut stack: Vec<&Mod> = Vec::new();
        fn dfs<'a>(
            v: &'a Mod,
            edges: &'a BTreeMap<Mod, BTreeMap<Mod, String>>,
            state: &mut BTreeMap<&'a Mod, u8>,
            stack: &mut Vec<&'a Mod>,
        ) -> Option<String> {
            state.insert(v, 1);
            stack.push(v);
            for (w, _) in edges.get(v).into_iter().flatten() {
                match state.get(w) {
                    Some(1) => {
                        let at = stack.iter().position(|s| *s == w).expect("on the stack");
                        let mut cycle: Vec<&Mod> = stack[at..].to_vec();
                        cycle.push(w);
                        let text = cycle
                            .windows(2)
                            .map(|p| format!("{} → ({})", name(p[0]), edges[p[0]][p[1]]))
                            .collect::<Vec<_>>()
                            .join(" ");
                        return Some(format!("{text} {}", name(w)));
                    }
                    Some(_) => {}
                    None => {
                        if let Some(c) = dfs(w, edges, state, stack) {
                            return Some(c);
                        }
                    }
                }
            }
            stack.pop();
            state.insert(v, 2);
            None
        }
        for v in edges.keys() {
            if !state.contains_key(v) {
                if let Some(c) = dfs(v, &edges, &mut state, &mut stack) {
                    return Some(c);
                }
            }
        }
        None
    }
}

/// Every `.rs` file under `dir` as a module of the crate rooted at `root_file` (`lib.rs` or
/// `main.rs`); directories named in `skip` are other crates.
fn load(dir: &Path, skip: &[&str]) -> BTreeMap<Mod, String> {
    fn walk(dir: &Path, rel: &mut Mod, skip: &[&str], out: &mut BTreeMap<Mod, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read src dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let file = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if skip.contains(&file) {
                    continue;
                }
                rel.push(file.to_owned());
                walk(&p, rel, skip, out);
                rel.pop();
            } else if let Some(stem) = file.strip_suffix(".rs") {
                let mut m = rel.clone();
                match stem {
                    "lib" | "main" if rel.is_empty() => {}
                    "mod" => {}
                    s => m.push(s.to_owned()),
                }
                let src = std::fs::read_to_string(&p).expect("read source");
                out.insert(m, code_of(&src));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut Vec::new(), skip, &mut out);
    out
}

#[test]
fn the_client_library_has_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = Graph::new(load(&src, &["bin"]));
    assert!(g.modules.len() > 10, "found only {:?}", g.modules.keys());
    if let Some(c) = g.circle() {
        panic!("import circle in the client crate: {c}");
    }
}

#[test]
fn the_cli_has_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/whispeer");
    let g = Graph::new(load(&src, &[]));
    assert!(g.modules.len() > 3, "found only {:?}", g.modules.keys());
    if let Some(c) = g.circle() {
        panic!("import circle in the whispeer CLI: {c}");
    }
}

fn synthetic(files: &[(&str, &str)]) -> Graph {
    Graph::new(
        files
            .iter()
            .map(|(m, code)| {
                let m: Mod = m
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                (m, code_of(code))
            })
            .collect(),
    )
}

#[test]
fn the_checker_finds_circles() {
    // Plain, with a brace group, inline, through a parent's re-export, through super.
    let direct = synthetic(&[
        ("", "mod a; mod b;"),
        ("a", "use crate::b::X;"),
        ("b", "use crate::{a::Y, c};"),
    ]);
    let c = direct.circle().expect("a ↔ b");
    assert!(
        c.contains("a → (crate::b::X)") && c.contains("b → (crate::a::Y)"),
        "{c}"
    );

    let inline = synthetic(&[
        ("", ""),
        ("a", "fn f() -> crate::b::X { crate::b::X }"),
        ("b", "impl crate::a::Y {}"),
    ]);
    assert!(inline.circle().is_some());

    let reexport = synthetic(&[
        ("", "pub use client::Builder;"),
        ("client", "mod builder; pub use builder::Builder;"),
        ("client::builder", "use crate::options::Engine;"),
        ("options", "use crate::Builder;"),
    ]);
    let c = reexport
        .circle()
        .unwrap_or_else(|| panic!("options ↔ client::builder: {:?}", reexport.edges()));
    assert!(c.contains("client::builder"), "{c}");

    let sup = synthetic(&[
        ("", ""),
        ("p", "mod x; mod y;"),
        ("p::x", "use super::y::Y;"),
        ("p::y", "pub(crate) use super::x::X as Z;"),
    ]);
    assert!(sup.circle().is_some());

    // Not circles: a parent re-exporting its children that use the parent; comments; tests.
    let fine = synthetic(&[
        ("", "mod core; pub use core::conn::Engine;"),
        ("core", "mod conn; pub use conn::Engine; pub struct Stats;"),
        (
            "core::conn",
            "use crate::core::Stats;\n// use crate::x::Y;\n",
        ),
        (
            "x",
            "use crate::core::Stats;\n#[cfg(test)]\nmod tests {\n    use crate::y::Z;\n}\n",
        ),
        ("y", "use crate::x::Y;"),
    ]);
    assert_eq!(fine.circle(), None);
}
