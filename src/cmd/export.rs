//! `vdiskfs export`: the merged disk (chain + optional overlay) written to a file or device, and
//! the sync state recording what the target then holds.

use vdiskfs::export::ExportConfig;
use vdiskfs::open::open_images;
use vdiskfs::sync::{LayerRecord, export_recorded};
use vdiskfs::{Result, export};

use super::progress::Bar;
use super::{human, one_disk};
use crate::cli::{ExportArgs, absolute};

pub fn run(a: &ExportArgs) -> Result<()> {
    let bar = Bar::new(!a.quiet);
    let (images, target) = a.images_and_target()?;
    let disks = open_images(&images, &a.open.options()?, &bar)?;
    let disk = one_disk(disks, a.disk.as_deref(), &a.image)?;
    let disk = match &a.overlay {
        Some(p) => disk.attach_overlay(p, 0, false)?,
        None => disk,
    };
    let ecfg = ExportConfig {
        target: absolute(&target)?,
        target_zeroed: a.target_zeroed,
        verify: a.verify,
        threads: a.threads.clamp(1, 64),
    };
    let (st, state) = if a.no_state {
        (export::export(&disk, &ecfg, &bar)?, None)
    } else {
        export_recorded(&disk, &ecfg, a.state.as_deref(), &bar)?
    };
    let secs = st.elapsed.as_secs_f64().max(1e-9);
    let recorded = match (&state, disk.overlay()) {
        (Some(p), _) => {
            let top = LayerRecord::of(disk.chain().layers()[0].as_ref());
            format!("; sync state {} names {}", p.display(), top.describe())
        }
        (None, Some(_)) => "; no sync state (the overlay's writes are in no chain)".into(),
        (None, None) if a.no_state => String::new(),
        (None, None) => "; no sync state (a block device needs --state FILE)".into(),
    };
    eprintln!(
        "exported {} ({}) to {} in {:.2} s: {} written ({:.0} MB/s), {} zeros skipped, {} zeroed{}{recorded}",
        disk.name(),
        human(disk.size()),
        target.display(),
        secs,
        human(st.written),
        st.written as f64 / secs / 1e6,
        human(st.skipped),
        human(st.zeroed),
        if st.verified { "; verified" } else { "" }
    );
    Ok(())
}
