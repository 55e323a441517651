//! `vdiskfs map`: the merged chain's allocation extents, as a table or as `qemu-img map
//! --output=json` shaped JSON.

use std::io::Write;

use serde_json::json;
use vdiskfs::chain::{Chain, Extent, ExtentKind};
use vdiskfs::open::open_images;
use vdiskfs::{Error, Result};

use super::progress::Bar;
use crate::cli::InfoArgs;

/// One extent as `map` shows it.
struct Row {
    depth: usize,
    data: bool,
    /// Some layer decides it (false: no layer allocates it, a hole).
    present: bool,
    offset: Option<u64>,
    compressed: bool,
}

impl Row {
    fn of(chain: &Chain, e: &Extent) -> Row {
        let layers = chain.layers();
        match e.kind {
            ExtentKind::Data { depth, source, offset } => Row {
                depth: depth as usize,
                data: true,
                present: true,
                offset: Some(offset),
                compressed: layers[depth as usize].compressed(source as usize),
            },
            ExtentKind::Zero { depth } => Row {
                depth: depth as usize,
                data: false,
                present: (depth as usize) < layers.len(),
                offset: None,
                compressed: false,
            },
        }
    }

    fn kind(&self) -> &'static str {
        match (self.data, self.present) {
            (true, _) => "data",
            (false, true) => "zero",
            (false, false) => "hole",
        }
    }
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let disks = open_images(&a.images()?, &a.open.options()?, &Bar::new(true))?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    let wr = |e: std::io::Error| Error::io("writing output", e);
    for d in &disks {
        let chain = d.chain();
        if a.json {
            write!(w, "[").map_err(wr)?;
        } else {
            writeln!(w, "{:<20}{:<20}{:<8}{:<10}{:<20}File", "Offset", "Length", "Depth", "Kind", "Mapped to")
                .map_err(wr)?;
        }
        for (i, e) in chain.walk(0).enumerate() {
            let e = e?;
            let r = Row::of(chain, &e);
            if a.json {
                let mut o = json!({"start": e.start, "length": e.len, "depth": r.depth, "present": r.present,
                    "zero": !r.data, "data": r.data, "compressed": r.compressed});
                if let Some(off) = r.offset {
                    o["offset"] = json!(off);
                }
                write!(w, "{}{o}", if i == 0 { "" } else { ",\n" }).map_err(wr)?;
            } else {
                let file = match (chain.layers().get(r.depth), e.kind) {
                    (Some(l), ExtentKind::Data { source, .. }) => l.source_name(source as usize),
                    (Some(l), _) => l.location().to_string(),
                    (None, _) => String::new(),
                };
                let mapped = r.offset.map(|o| format!("{o:#x}")).unwrap_or_default();
                let (start, len) = (format!("{:#x}", e.start), format!("{:#x}", e.len));
                writeln!(w, "{start:<20}{len:<20}{:<8}{:<10}{mapped:<20}{file}", r.depth, r.kind()).map_err(wr)?;
            }
        }
        if a.json {
            writeln!(w, "]").map_err(wr)?;
        }
    }
    w.flush().map_err(wr)
}
