//! The engine's modules depend on each other in one direction only. Each top-level module has a
//! rank; a module may name (`crate::x`) only modules of a lower rank, so no import cycle can
//! form. A new top-level module must be given its place here.

use std::collections::BTreeSet;
use std::path::Path;

/// Top-level modules of the library, lowest first.
const RANKS: &[(&str, u32)] = &[
    ("error", 0),
    ("cache", 0),
    ("progress", 0),
    ("holders", 0),
    ("source", 1),
    ("layer", 2),
    ("gate", 3),
    ("formats", 4),
    ("chain", 4),
    ("overlay", 4),
    ("compose", 5),
    ("disk", 5),
    ("export", 6),
    ("fs", 6),
    ("open", 7),
    ("sync", 7),
];

/// Names the crate root re-exports, and the module each comes from.
const ROOT_REEXPORTS: &[(&str, &str)] =
    &[("Error", "error"), ("ErrorKind", "error"), ("Kind", "error"), ("Result", "error")];

fn rank(m: &str) -> u32 {
    RANKS
        .iter()
        .find(|(n, _)| *n == m)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!("module {m} has no rank in layering.rs"))
}

/// The top-level modules a source text names through `crate::`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').map(|s| s.trim().split("::").next().unwrap_or("")).collect()
        } else {
            vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")]
        };
        for n in names.into_iter().filter(|n| !n.is_empty()) {
            let m = ROOT_REEXPORTS.iter().find(|(e, _)| *e == n).map_or(n, |(_, m)| m);
            out.insert(m.to_string());
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

crate::register!(library_modules_only_name_lower_layers);
fn library_modules_only_name_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        // The binary (main.rs, cli.rs, cmd/) sits above the library; lib.rs is the root.
        if ["main", "cli", "cmd", "lib"].contains(&top.as_str()) {
            continue;
        }
        for m in named_modules(&std::fs::read_to_string(&f).unwrap()) {
            if m != top && rank(&m) >= rank(&top) {
                edges.push(format!("{} names crate::{m}", rel.display()));
            }
        }
    }
    assert!(
        edges.is_empty(),
        "imports against the layering (a module may only name lower ranks):\n{}",
        edges.join("\n")
    );
}

crate::register!(the_scanner_sees_grouped_and_plain_paths);
fn the_scanner_sees_grouped_and_plain_paths() {
    let got =
        named_modules("use crate::{chain::Chain, error::Result};\nlet x = crate::gate::Gate::new(); crate::Error::x");
    assert_eq!(got.into_iter().collect::<Vec<_>>(), ["chain", "error", "gate"]);
}
