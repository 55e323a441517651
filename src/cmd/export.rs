//! `vdiskfs export`: the merged disk (chain + optional overlay) written to a file or device.

use vdiskfs::export::{ExportConfig, export};
use vdiskfs::open::open_images;
use vdiskfs::{Error, Result};

use super::progress::Bar;
use crate::cli::ExportArgs;

pub fn run(a: &ExportArgs) -> Result<()> {
    let bar = Bar::new(!a.quiet);
    let (images, target) = a.images_and_target()?;
    let mut disks = open_images(&images, &a.open.options()?, &bar)?;
    let disk = match &a.disk {
        Some(n) => {
            let names: Vec<String> = disks.iter().map(|d| d.name().to_string()).collect();
            let i = disks.iter().position(|d| d.name() == n || d.name().trim_end_matches(".raw") == n).ok_or_else(
                || Error::usage(format!("no disk {n} in {} (it has {})", a.image.display(), names.join(", "))),
            )?;
            disks.swap_remove(i)
        }
        None if disks.len() == 1 => disks.remove(0),
        None => {
            let names: Vec<String> = disks.iter().map(|d| d.name().to_string()).collect();
            return Err(Error::usage(format!(
                "{} holds {} disks ({}); choose one with --disk NAME",
                a.image.display(),
                disks.len(),
                names.join(", ")
            )));
        }
    };
    let disk = match &a.overlay {
        Some(p) => disk.attach_overlay(p, 0, false)?,
        None => disk,
    };
    let ecfg = ExportConfig {
        target: target.clone(),
        target_zeroed: a.target_zeroed,
        verify: a.verify,
        threads: a.threads.clamp(1, 64),
    };
    let st = export(&disk, &ecfg, &bar)?;
    let secs = st.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "exported {} ({} bytes) to {} in {:.2} s: {} bytes written ({:.0} MB/s), {} zero bytes skipped, {} zeroed{}",
        disk.name(),
        disk.size(),
        target.display(),
        secs,
        st.written,
        st.written as f64 / secs / 1e6,
        st.skipped,
        st.zeroed,
        if st.verified { "; verified" } else { "" }
    );
    Ok(())
}
