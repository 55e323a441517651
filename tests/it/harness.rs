//! A small test harness that can say "skipped": libtest counts a test that returned early for
//! lack of a tool as passed, which makes a newcomer's first run dishonest.
//!
//! Tests register with [`crate::register!`] and run in parallel, one thread each (named after
//! the test, so panic messages name it). A test that cannot run calls [`skip`] (through
//! `common::need`): it is reported as `ignored` with its reason, and counted so in the closing
//! line, which keeps libtest's shape (`test result: ok. N passed; N failed; N ignored; …`).
//! Under `CI=true` a missing tool is a failure instead (see `common::need`). A test that ran
//! but could not use an optional extra oracle records it with [`note`]; the notes are listed at
//! the end.
//!
//! Arguments, as libtest takes them: name filters (substring; `--exact` for whole names),
//! `--skip FILTER`, `--list`, `--test-threads N` (or `RUST_TEST_THREADS`); `--nocapture`,
//! `--quiet` and `--show-output` are accepted (nothing is captured).

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// One registered test.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
}

inventory::collect!(Test);

/// Registers `fn NAME()` in this module as a test named `module::NAME`.
#[macro_export]
macro_rules! register {
    ($f:ident) => {
        inventory::submit! { $crate::harness::Test { name: concat!(module_path!(), "::", stringify!($f)), run: $f } }
    };
}

/// The unwind payload of a skip: not a failure, and not a panic message either.
struct Skip(String);

/// Ends the current test as skipped, with `reason`.
pub fn skip(reason: impl Into<String>) -> ! {
    panic::resume_unwind(Box::new(Skip(reason.into())))
}

thread_local! {
    static NOTES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Records that the current test left out an optional check (an extra oracle not installed).
pub fn note(what: impl Into<String>) {
    NOTES.with_borrow_mut(|n| n.push(what.into()));
}

enum Outcome {
    Passed(Vec<String>),
    Failed(String),
    Skipped(String),
}

fn run_one(t: &'static Test) -> Outcome {
    let h = std::thread::Builder::new()
        .name(t.name.to_string())
        .spawn(move || {
            let r = panic::catch_unwind(AssertUnwindSafe(t.run));
            (r, NOTES.with_borrow_mut(std::mem::take))
        })
        .expect("spawn a test thread");
    match h.join() {
        Ok((Ok(()), notes)) => Outcome::Passed(notes),
        Ok((Err(p), _)) | Err(p) => match p.downcast::<Skip>() {
            Ok(s) => Outcome::Skipped(s.0),
            Err(p) => Outcome::Failed(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        },
    }
}

struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    threads: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        filters: Vec::new(),
        skips: Vec::new(),
        exact: false,
        list: false,
        threads: std::env::var("RUST_TEST_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--exact" => a.exact = true,
            "--list" => a.list = true,
            "--skip" => a.skips.extend(it.next()),
            "--test-threads" => a.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.threads),
            s if s.starts_with("--test-threads=") => a.threads = s[15..].parse().unwrap_or(a.threads),
            s if s.starts_with('-') => {} // --nocapture, --quiet, --show-output, --color …: nothing to do
            s => a.filters.push(s.to_string()),
        }
    }
    a.threads = a.threads.max(1);
    a
}

/// The test's name without the crate's own module prefix (`it::vhd::x` → `vhd::x`).
fn short(name: &str) -> &str {
    name.split_once("::").map_or(name, |(_, rest)| rest)
}

pub fn main() {
    let args = parse_args();
    let matches = |n: &str| {
        let hit = |f: &String| if args.exact { n == f } else { n.contains(f.as_str()) };
        (args.filters.is_empty() || args.filters.iter().any(hit)) && !args.skips.iter().any(|s| n.contains(s.as_str()))
    };
    let mut all: Vec<&'static Test> = inventory::iter::<Test>.into_iter().collect();
    all.sort_by_key(|t| t.name);
    let total = all.len();
    let tests: Vec<&'static Test> = all.into_iter().filter(|t| matches(short(t.name))).collect();
    if args.list {
        for t in &tests {
            println!("{}: test", short(t.name));
        }
        return;
    }
    println!("\nrunning {} tests", tests.len());
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(&'static str, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.threads.min(tests.len().max(1)) {
            s.spawn(|| {
                while let Some(t) = tests.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let o = run_one(t);
                    let line = match &o {
                        Outcome::Passed(n) if n.is_empty() => "ok".to_string(),
                        Outcome::Passed(n) => format!("ok (left out: {})", n.join("; ")),
                        Outcome::Failed(_) => "FAILED".to_string(),
                        Outcome::Skipped(r) => format!("ignored, skipped: {r}"),
                    };
                    println!("test {} ... {line}", short(t.name));
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((t.name, o));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|(_, o)| f(o)).count();
    let passed = count(|o| matches!(o, Outcome::Passed(_)));
    let failed = count(|o| matches!(o, Outcome::Failed(_)));
    let skipped = count(|o| matches!(o, Outcome::Skipped(_)));
    let mut sorted: Vec<&(&str, Outcome)> = results.iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    let skips: Vec<String> = sorted
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Skipped(r) => Some(format!("    {}: {r}", short(n))),
            _ => None,
        })
        .collect();
    if !skips.is_empty() {
        println!("\nskipped (not counted as passed):\n{}", skips.join("\n"));
    }
    let notes: Vec<String> = sorted
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Passed(v) if !v.is_empty() => Some(format!("    {}: {}", short(n), v.join("; "))),
            _ => None,
        })
        .collect();
    if !notes.is_empty() {
        println!("\npassed without an optional extra check:\n{}", notes.join("\n"));
    }
    let failures: Vec<String> = sorted
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Failed(m) => Some(format!("---- {} ----\n{m}\n", short(n))),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        println!("\nfailures:\n\n{}", failures.join("\n"));
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        total - tests.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(101);
    }
}
