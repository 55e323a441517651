//! `vdiskfs check`: read every allocated byte of every disk of an image through the normal read
//! path, so every stored checksum (XVA chunk checksums) is verified and every structure a read
//! needs is exercised. Each bad range is reported with the error the read gave (for XVA it names
//! the chunk member); the run fails when any range is bad.

use std::io::IsTerminal;

use serde_json::json;

use crate::app;
use crate::chain::MAP_BLOCK;
use crate::cli::InfoArgs;
use crate::error::{Error, Result};

/// One range that could not be read.
struct Bad {
    disk: String,
    offset: u64,
    len: u64,
    error: String,
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let mut cfg = a.open.config()?;
    cfg.verify = true; // `check` verifies whatever --no-verify says
    let disks = app::open_disks(std::slice::from_ref(&a.image), &cfg)?;
    let mut total = 0;
    for d in &disks {
        total += d.chain().allocated_bytes()?;
    }
    let pb = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "checking [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    });
    // The bad ranges are the report; don't repeat each as a log line unless asked (-v).
    let level = log::max_level();
    if level <= log::LevelFilter::Warn {
        log::set_max_level(log::LevelFilter::Off);
    }
    let mut bad: Vec<Bad> = Vec::new();
    let mut per_disk = Vec::new();
    let mut buf = vec![0u8; MAP_BLOCK as usize];
    for d in &disks {
        let chain = d.chain();
        let (mut checked, mut ranges, before) = (0u64, 0u64, bad.len());
        const WINDOW: u64 = 1 << 30;
        let mut pos = 0;
        while pos < chain.size() {
            for e in chain.extents(pos, WINDOW)?.into_iter().filter(|e| e.is_data()) {
                let mut off = e.start;
                while off < e.end() {
                    let n = (e.end() - off).min(MAP_BLOCK);
                    ranges += 1;
                    if let Err(err) = chain.read(off, &mut buf[..n as usize]) {
                        bad.push(Bad {
                            disk: d.name().to_string(),
                            offset: off,
                            len: n,
                            error: err.message().to_string(),
                        });
                        if !a.json {
                            let b = &bad[bad.len() - 1];
                            let line = format!("BAD {} {:#x}+{:#x}: {}", b.disk, b.offset, b.len, b.error);
                            match &pb {
                                Some(pb) => pb.println(line),
                                None => println!("{line}"),
                            }
                        }
                    }
                    checked += n;
                    if let Some(pb) = &pb {
                        pb.inc(n);
                    }
                    off += n;
                }
            }
            pos = pos.saturating_add(WINDOW);
        }
        per_disk.push((d.name().to_string(), checked, ranges, bad.len() - before));
    }
    log::set_max_level(level);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if a.json {
        let v = json!({
            "image": a.image.display().to_string(),
            "ok": bad.is_empty(),
            "disks": per_disk.iter().map(|(n, c, r, b)| json!({"name": n, "checked_bytes": c, "ranges": r, "bad": b})).collect::<Vec<_>>(),
            "bad": bad.iter().map(|b| json!({"disk": b.disk, "offset": b.offset, "length": b.len, "error": b.error})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for (n, c, r, b) in &per_disk {
            println!("{n}: {c} bytes in {r} ranges checked, {b} bad");
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::corrupt(format!("{} bad range(s); each is listed above", bad.len())).in_file(a.image.display()))
}
