//! The layering of `crates/vmbeam-vmm/src`, enforced.
//!
//! Every source file belongs to exactly one layer of [`LAYERS`], listed
//! from the bottom up. A file may use its own layer and the layers below
//! it, never one above; and the graph of which file uses which has no
//! cycle. A submodule is part of its parent (it sees the parent's private
//! items and the parent declares it), so its uses of its own ancestors do
//! not count towards a cycle; every other use does. "Uses" is every `crate::…` path in the file (in code, in `use`
//! groups such as `use crate::{a, b::{c, d}}`, and in doc links), and every
//! `super::…` / `self::…` path resolved against the file's module. The
//! table is the one place the layering is declared; docs/architecture.md
//! draws it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up, and the modules (one per source file)
/// in each. `a::b` is `src/a/b.rs` or `src/a/b/mod.rs`; `lib` is `src/lib.rs`.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &["base", "base::sync", "base::progress", "base::size"],
    ),
    (
        "host",
        &[
            "host",
            "host::memory",
            "host::arch",
            "host::loader",
            "host::console",
            "host::kick",
            "host::bounds",
            "host::images",
            "host::names",
        ],
    ),
    (
        "devices",
        &[
            "devices",
            "devices::queue",
            "devices::mmio",
            "devices::blk",
            "devices::tap",
            "devices::binding",
            "devices::net",
        ],
    ),
    ("nesting", &["nesting", "nesting::nested", "nesting::table"]),
    ("l1", &["l1", "l1::hostvm", "l1::dispatch", "l1::shared"]),
    (
        "migration",
        &[
            "migration",
            "migration::mode",
            "migration::copy",
            "migration::verify",
            "migration::handover_state",
            "migration::handover",
            "migration::batch",
            "migration::rescue",
            "migration::report",
            "migration::rejuvenate",
            "migration::wire",
            "migration::transport",
            "migration::tls",
            "migration::link",
            "migration::region_desc",
            "migration::reuse",
            "migration::uffd",
            "migration::remote",
            "migration::remote::postcopy",
        ],
    ),
    ("hypercall", &["hypercall", "hypercall::handlers"]),
    (
        "control",
        &[
            "control",
            "control::events",
            "control::inspect",
            "control::jobs",
            "control::metrics",
            "control::policy",
            "control::status",
        ],
    ),
    ("vmm", &["vmm", "config"]),
    ("api", &["api", "api::http"]),
    ("crate", &["lib"]),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path of a source file (`host/mod.rs` → `host`, `lib.rs` → `lib`).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    if parts.is_empty() || parts == ["lib"] {
        return "lib".into();
    }
    parts.join("::")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Splits source text into code (comments and string literals blanked)
/// and comment text (everything else blanked), keeping offsets.
fn split(src: &str) -> (String, String) {
    let b = src.as_bytes();
    let mut code = vec![b' '; b.len()];
    let mut comm = vec![b' '; b.len()];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\n' {
            code[i] = b'\n';
            comm[i] = b'\n';
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                comm[i] = b[i];
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    comm[i] = b[i];
                    i += 1;
                }
            }
        } else if b[i] == b'"' || b[i..].starts_with(b"r#\"") || b[i..].starts_with(b"r\"") {
            // String literal (raw strings with up to one '#').
            let raw = b[i] == b'r';
            let hashes = if b[i..].starts_with(b"r#") { 1 } else { 0 };
            i += if raw { 2 + hashes } else { 1 };
            while i < b.len() {
                if !raw && b[i] == b'\\' {
                    i += 2;
                } else if b[i] == b'"' && (hashes == 0 || b.get(i + 1) == Some(&b'#')) {
                    i += 1 + hashes;
                    break;
                } else {
                    if b[i] == b'\n' {
                        code[i] = b'\n';
                    }
                    i += 1;
                }
            }
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => i = e + 1,
                None => {
                    code[i] = b[i];
                    i += 1;
                }
            }
        } else {
            code[i] = b[i];
            i += 1;
        }
    }
    (
        String::from_utf8_lossy(&code).into_owned(),
        String::from_utf8_lossy(&comm).into_owned(),
    )
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Parses the path tree after `crate::` at `b[i..]`: segments, `{…}`
/// groups (nested), `self`, `*`. Returns every full path it names.
fn parse_tree(b: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut path = prefix;
    loop {
        i = skip_ws(i);
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i = skip_ws(i);
                if i >= b.len() {
                    return i;
                }
                if b[i] == b'}' {
                    return i + 1;
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                i = parse_tree(b, i, path.clone(), out);
            }
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let seg = std::str::from_utf8(&b[start..i]).unwrap();
        if !seg.is_empty() && seg != "self" {
            path.push(seg.to_string());
        }
        if b[i..].starts_with(b"::") {
            i += 2;
            continue;
        }
        out.push(path);
        return i;
    }
}

/// Every path a file names, as module-relative segment lists from the
/// crate root: `(offset, segments)`.
fn paths_in(module: &str, src: &str) -> Vec<(usize, Vec<String>)> {
    let (code, comments) = split(src);
    let here: Vec<String> = if module == "lib" {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let mut found = Vec::new();
    for (text, relative) in [(&code, true), (&comments, false)] {
        let b = text.as_bytes();
        // Inline `mod name {` blocks (tests) nest the module path.
        let mut braces: Vec<Option<String>> = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let boundary = i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b'$');
            if relative && b[i] == b'{' {
                // Is this `mod NAME {`?
                let before = text[..i].trim_end();
                let name_start = before
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(0, |p| p + 1);
                let name = &before[name_start..];
                let kw = before[..name_start].trim_end();
                braces.push((kw.ends_with("mod") && !name.is_empty()).then(|| name.to_string()));
                i += 1;
                continue;
            }
            if relative && b[i] == b'}' {
                braces.pop();
                i += 1;
                continue;
            }
            if boundary && b[i..].starts_with(b"crate::") {
                let mut out = Vec::new();
                parse_tree(b, i + 7, Vec::new(), &mut out);
                found.extend(out.into_iter().map(|p| (i, p)));
                i += 7;
                continue;
            }
            if relative
                && boundary
                && (b[i..].starts_with(b"super::") || b[i..].starts_with(b"self::"))
            {
                let mut base = here.clone();
                base.extend(braces.iter().flatten().cloned());
                let mut j = i;
                if b[j..].starts_with(b"self::") {
                    j += 6;
                }
                while b[j..].starts_with(b"super::") {
                    base.pop();
                    j += 7;
                }
                let mut out = Vec::new();
                parse_tree(b, j, base, &mut out);
                found.extend(out.into_iter().map(|p| (i, p)));
                i = j;
                continue;
            }
            i += 1;
        }
    }
    found
}

/// The module (of `modules`) a path lands in: its longest known prefix.
fn target(path: &[String], modules: &BTreeSet<String>) -> String {
    for n in (1..=path.len()).rev() {
        let m = path[..n].join("::");
        if modules.contains(&m) {
            return m;
        }
    }
    "lib".into()
}

/// Whether module `a` is an ancestor of module `m` (`lib` is everyone's).
fn is_ancestor(a: &str, m: &str) -> bool {
    a == "lib" || m.starts_with(&format!("{a}::"))
}

fn line_of(src: &str, off: usize) -> usize {
    src[..off].matches('\n').count() + 1
}

struct Graph {
    /// module → its layer index.
    layer: BTreeMap<String, usize>,
    /// module → (used module → first line using it).
    uses: BTreeMap<String, BTreeMap<String, usize>>,
    files: BTreeMap<String, PathBuf>,
    unlisted: Vec<String>,
}

fn graph() -> Graph {
    let mut table = BTreeMap::new();
    for (i, (_, mods)) in LAYERS.iter().enumerate() {
        for m in *mods {
            assert!(
                table.insert(m.to_string(), i).is_none(),
                "module {m} is listed twice in LAYERS"
            );
        }
    }
    let src = src_dir();
    let mut paths = Vec::new();
    rs_files(&src, &mut paths);
    let mut files = BTreeMap::new();
    for p in paths {
        files.insert(module_of(p.strip_prefix(&src).unwrap()), p);
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let unlisted = modules
        .iter()
        .filter(|m| !table.contains_key(*m))
        .cloned()
        .collect();
    let mut uses = BTreeMap::new();
    for (m, p) in &files {
        let text = std::fs::read_to_string(p).unwrap();
        let mut u: BTreeMap<String, usize> = BTreeMap::new();
        for (off, path) in paths_in(m, &text) {
            let t = target(&path, &modules);
            if t != *m {
                u.entry(t).or_insert_with(|| line_of(&text, off));
            }
        }
        uses.insert(m.clone(), u);
    }
    Graph {
        layer: table,
        uses,
        files,
        unlisted,
    }
}

/// A cycle in the use graph, if any (as the modules along it).
fn find_cycle(uses: &BTreeMap<String, BTreeMap<String, usize>>) -> Option<Vec<String>> {
    // 0 = unseen, 1 = on the stack, 2 = done.
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeMap<String, usize>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        let next = uses.get(m).into_iter().flat_map(|u| u.keys());
        for n in next.filter(|n| !is_ancestor(n, m)) {
            match state.get(n.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == n).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(n.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(n, uses, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in uses.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(m, uses, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn every_source_file_has_a_layer() {
    let g = graph();
    assert!(
        g.unlisted.is_empty(),
        "source files not in the LAYERS table of tests/layers.rs: {:?}",
        g.unlisted
            .iter()
            .map(|m| g.files[m].display().to_string())
            .collect::<Vec<_>>()
    );
    let gone: Vec<_> = g
        .layer
        .keys()
        .filter(|m| !g.files.contains_key(*m))
        .collect();
    assert!(
        gone.is_empty(),
        "LAYERS lists modules with no file: {gone:?}"
    );
}

#[test]
fn no_file_uses_a_higher_layer() {
    let g = graph();
    let mut bad = Vec::new();
    for (m, u) in &g.uses {
        let Some(&from) = g.layer.get(m) else {
            continue;
        };
        for (t, line) in u {
            let Some(&to) = g.layer.get(t) else { continue };
            if to > from {
                bad.push(format!(
                    "{}:{line}: layer {} uses crate::{t} of higher layer {}",
                    g.files[m].display(),
                    LAYERS[from].0,
                    LAYERS[to].0
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    if let Some(c) = find_cycle(&g.uses) {
        let steps: Vec<String> = c
            .windows(2)
            .map(|w| {
                format!(
                    "{} uses crate::{} (line {})",
                    g.files[&w[0]].display(),
                    w[1],
                    g.uses[&w[0]][&w[1]]
                )
            })
            .collect();
        panic!("the module graph has a cycle:\n{}", steps.join("\n"));
    }
}

/// The scanner itself: groups, nested groups, `self`, `super`, inline
/// test modules and doc links are all seen.
#[test]
fn the_scanner_sees_every_form_of_path() {
    let src = "use crate::{a, b::{c, d::E}, f::{self, G}};\n\
               /// See [`crate::h::I`].\n\
               fn x() { let s = \"crate::not_code\"; crate::j::k(); }\n\
               mod tests { use super::*; use super::super::m::N; }\n";
    let mut got: Vec<String> = paths_in("p::q", src)
        .into_iter()
        .map(|(_, p)| p.join("::"))
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["a", "b::c", "b::d::E", "f", "f::G", "h::I", "j::k", "p::m::N", "p::q"]
    );
}
