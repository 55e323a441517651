//! `vdiskfs check`: read every allocated byte of every disk of an image through the normal read
//! path, so every stored checksum (XVA chunk checksums) is verified and every structure a read
//! needs is exercised. Each bad range is reported with the error the read gave (for XVA it names
//! the chunk member); the run fails when any range is bad.

use serde_json::json;
use vdiskfs::chain::MAP_BLOCK;
use vdiskfs::disk::Disk;
use vdiskfs::open::open_images;
use vdiskfs::progress::Progress;
use vdiskfs::{Error, Kind, Result};

use super::progress::Bar;
use crate::cli::InfoArgs;

/// One range that could not be read.
struct Bad {
    disk: String,
    offset: u64,
    len: u64,
    error: String,
}

/// What was checked of one disk.
struct Checked {
    name: String,
    bytes: u64,
    ranges: u64,
    bad: usize,
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let mut opts = a.open.options()?;
    opts.xva.verify = true; // `check` verifies whatever --no-verify says
    let bar = Bar::new(!a.json);
    let disks = open_images(&a.images()?, &opts, &bar)?;
    let mut total = 0;
    for d in &disks {
        total += d.chain().allocated_bytes()?;
    }
    // The bad ranges are the report; don't repeat each as a log line unless asked (-v).
    let level = log::max_level();
    if level <= log::LevelFilter::Warn {
        log::set_max_level(log::LevelFilter::Off);
    }
    bar.start("checking", total);
    let mut bad: Vec<Bad> = Vec::new();
    let mut checked = Vec::new();
    for d in &disks {
        checked.push(check_disk(d, &mut bad, &bar, a.json)?);
    }
    log::set_max_level(level);
    bar.finish();
    if a.json {
        let v = json!({
            "image": a.image.display().to_string(),
            "ok": bad.is_empty(),
            "disks": checked.iter().map(|c| json!({"name": c.name, "checked_bytes": c.bytes, "ranges": c.ranges, "bad": c.bad})).collect::<Vec<_>>(),
            "bad": bad.iter().map(|b| json!({"disk": b.disk, "offset": b.offset, "length": b.len, "error": b.error})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for c in &checked {
            println!("{}: {} bytes in {} ranges checked, {} bad", c.name, c.bytes, c.ranges, c.bad);
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::new(Kind::Corrupt, format!("{} bad range(s); each is listed above", bad.len()))
        .in_file(a.image.display()))
}

/// Reads every data extent of `d` in map-block pieces, recording each piece that fails.
fn check_disk(d: &Disk, bad: &mut Vec<Bad>, bar: &Bar, json: bool) -> Result<Checked> {
    let chain = d.chain();
    let mut c = Checked { name: d.name().to_string(), bytes: 0, ranges: 0, bad: 0 };
    let mut buf = vec![0u8; MAP_BLOCK as usize];
    for e in chain.walk(0) {
        let e = e?;
        if !e.is_data() {
            continue;
        }
        let mut off = e.start;
        while off < e.end() {
            let n = (e.end() - off).min(MAP_BLOCK);
            c.ranges += 1;
            if let Err(err) = chain.read(off, &mut buf[..n as usize]) {
                let b = Bad { disk: c.name.clone(), offset: off, len: n, error: err.message() };
                if !json {
                    bar.note(&format!("BAD {} {:#x}+{:#x}: {}", b.disk, b.offset, b.len, b.error));
                }
                bad.push(b);
                c.bad += 1;
            }
            c.bytes += n;
            bar.advance(n);
            off += n;
        }
    }
    Ok(c)
}
