//! `vdiskfs sync`: only what changed since the target's last export or sync; `--dry-run` prints
//! the plan and an estimated time instead.

use serde_json::json;
use vdiskfs::Result;
use vdiskfs::disk::Disk;
use vdiskfs::open::open_images;
use vdiskfs::sync::{MEASURE_BYTES, ReadRate, SyncConfig, SyncPlan, measure_read_rate};

use super::progress::Bar;
use super::{human, one_disk};
use crate::cli::{SyncArgs, absolute, image};

/// Ranges a text dry run lists (`--json` lists them all).
const LISTED_RANGES: usize = 50;

pub fn run(a: &SyncArgs) -> Result<()> {
    let bar = Bar::new(!a.quiet && !a.dry_run);
    let disks = open_images(&[image(&a.image)?], &a.open.options()?, &bar)?;
    let disk = one_disk(disks, None, &a.image)?;
    let threads = a.threads.clamp(1, 64);
    let cfg = SyncConfig { target: absolute(&a.target)?, state: a.state.clone(), threads };
    let plan = SyncPlan::prepare(&disk, &cfg)?;
    if a.dry_run {
        let rate = measure_read_rate(&disk, plan.plan(), threads)?;
        return if a.json { dry_run_json(a, &plan, rate) } else { dry_run_text(a, &disk, &plan, rate) };
    }
    if let Some(p) = plan.finishing() {
        let toward = p.toward.first().map(|l| l.describe()).unwrap_or_default();
        eprintln!("vdiskfs: finishing the interrupted sync toward {toward}");
    }
    let (held, target) = (plan.held().describe(), a.target.display());
    let r = plan.apply(&bar)?;
    if r.written + r.zeroed == 0 {
        eprintln!("nothing to write: {target} holds {} (state {})", r.top.describe(), r.state.display());
        return Ok(());
    }
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "synced {} onto {target} in {secs:.2} s: {} written and {} zeroed ({:.0} MB/s); the target held {held} and now holds {} (state {})",
        disk.name(),
        human(r.written),
        human(r.zeroed),
        (r.written + r.zeroed) as f64 / secs / 1e6,
        r.top.describe(),
        r.state.display()
    );
    Ok(())
}

/// Seconds to read the plan's data at `rate` (zeroing is a few calls, not counted).
fn estimate(data: u64, rate: Option<ReadRate>) -> f64 {
    rate.map_or(0.0, |r| data as f64 / r.bytes_per_sec())
}

fn dry_run_text(a: &SyncArgs, disk: &Disk, plan: &SyncPlan, rate: Option<ReadRate>) -> Result<()> {
    let p = plan.plan();
    let layers = disk.chain().layers();
    println!("sync plan: {} onto {} (state {})", disk.name(), a.target.display(), plan.state_path().display());
    println!("target holds:  {} (depth {} of {})", plan.held().describe(), plan.held_depth(), layers.len());
    println!("new top:       {}", plan.new_top().describe());
    if let Some(f) = plan.finishing() {
        let toward = f.toward.first().map(|l| l.describe()).unwrap_or_default();
        println!("finishes:      an interrupted sync toward {toward} (every range is written again)");
    }
    println!("ranges:        {}", p.ranges.len());
    for r in p.ranges.iter().take(LISTED_RANGES) {
        let name = layers[r.depth].location().file_name();
        let kind = if r.data { "data" } else { "zero" };
        println!("  {:#014x} +{:<#14x} depth {} {kind} {name}", r.start, r.length, r.depth);
    }
    if p.ranges.len() > LISTED_RANGES {
        println!("  … {} more (--json lists every range)", p.ranges.len() - LISTED_RANGES);
    }
    println!("bytes per layer:");
    for l in &p.layers {
        println!("  [{}] {}: {} data, {} zeros", l.depth, l.path, human(l.data), human(l.zero));
    }
    let (data, zero) = (p.data_bytes(), p.zero_bytes());
    println!(
        "total:         {} ({} bytes): {} to copy, {} to zero",
        human(data + zero),
        data + zero,
        human(data),
        human(zero)
    );
    match rate {
        Some(r) => {
            println!(
                "read rate:     {:.0} MB/s, measured by reading {} of the planned data ({} readers, at most {} or 2 s) in {:.2} s",
                r.bytes_per_sec() / 1e6,
                human(r.bytes),
                a.threads.clamp(1, 64),
                human(MEASURE_BYTES),
                r.took.as_secs_f64()
            );
            println!("estimated:     {:.2} s to copy the data at that rate", estimate(data, rate));
        }
        None => println!("read rate:     not measured (no data to read)"),
    }
    Ok(())
}

fn dry_run_json(a: &SyncArgs, plan: &SyncPlan, rate: Option<ReadRate>) -> Result<()> {
    let p = plan.plan();
    let v = json!({
        "image": a.image.display().to_string(),
        "target": a.target.display().to_string(),
        "state": plan.state_path().display().to_string(),
        "held": plan.held(),
        "held_depth": plan.held_depth(),
        "new_top": plan.new_top(),
        "finishing": plan.finishing(),
        "ranges": p.ranges,
        "layers": p.layers,
        "data_bytes": p.data_bytes(),
        "zero_bytes": p.zero_bytes(),
        "total_bytes": p.data_bytes() + p.zero_bytes(),
        "read_rate": rate.map(|r| json!({"bytes": r.bytes, "seconds": r.took.as_secs_f64(), "bytes_per_second": r.bytes_per_sec()})),
        "estimated_seconds": estimate(p.data_bytes(), rate),
    });
    println!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
    Ok(())
}
