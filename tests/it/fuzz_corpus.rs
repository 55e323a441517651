//! The fuzzers' corpora, replayed: every file in `fuzz/corpus/<target>/` goes through the entry
//! function its fuzz target calls (the same file, `fuzz/entries/`, included here), so a normal
//! `cargo test` checks that nothing the fuzzers kept panics, and no fuzzer is needed for it.
//! The fuzzing itself (`cargo fuzz run`) is described in the README, "Fuzzing".

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(dead_code, unused_imports)]
#[path = "../../fuzz/entries/mod.rs"]
mod entries;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

crate::register!(every_fuzz_target_has_an_entry_and_a_corpus);
fn every_fuzz_target_has_an_entry_and_a_corpus() {
    let targets: Vec<String> =
        names_in(&fuzz_dir().join("fuzz_targets")).iter().map(|n| n.trim_end_matches(".rs").to_string()).collect();
    let mut listed: Vec<String> = entries::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(targets, listed, "fuzz/fuzz_targets/ and entries::TARGETS differ");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in &targets {
        assert!(manifest.contains(&format!("name = \"{t}\"")), "fuzz/Cargo.toml has no [[bin]] {t}");
        let corpus = names_in(&fuzz_dir().join("corpus").join(t));
        assert!(!corpus.is_empty(), "fuzz/corpus/{t} is empty");
    }
}

crate::register!(fuzz_templates_open_as_planned);
fn fuzz_templates_open_as_planned() {
    entries::check_templates();
}

crate::register!(fuzz_corpora_replay_without_panics);
fn fuzz_corpora_replay_without_panics() {
    let started = Instant::now();
    let mut total = 0;
    for (name, entry) in entries::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        for file in names_in(&dir) {
            let data = std::fs::read(dir.join(&file)).unwrap();
            let at = Instant::now();
            // A panic names the target and the file: `cargo fuzz run <target> <file>` reproduces it.
            let r = std::panic::catch_unwind(|| entry(&data));
            assert!(r.is_ok(), "fuzz/corpus/{name}/{file} panics");
            let took = at.elapsed();
            assert!(took < Duration::from_secs(5), "fuzz/corpus/{name}/{file} took {took:?}");
            total += 1;
        }
    }
    eprintln!("fuzz corpora: {total} inputs replayed in {:?}", started.elapsed());
}
