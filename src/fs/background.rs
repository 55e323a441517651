//! Work a mounted file system does on its own: the allocation count behind `st_blocks`, and the
//! periodic checkpoint of overlays.

use std::sync::Arc;
use std::time::Duration;

use super::VdiskFs;

/// How often dirty overlays are checkpointed: this bounds what a power loss can take, as a file
/// system's commit interval does (fsync and flush checkpoint at once).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Walks each disk's allocation once, at the lowest priority, so `st_blocks` becomes exact.
pub fn spawn_allocation_scan(fs: Arc<VdiskFs>) {
    let _ = std::thread::Builder::new().name("alloc".into()).spawn(move || {
        // Background work: let reads go first.
        // SAFETY: setpriority on this thread's own id.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        for d in fs.disks() {
            if let Err(e) = d.compute_allocated() {
                log::warn!("{}: allocation scan failed: {e}", d.name());
            }
        }
    });
}

/// Checkpoints dirty overlays every [`CHECKPOINT_INTERVAL`], when any disk is writable.
pub fn spawn_checkpointer(fs: Arc<VdiskFs>) {
    if !fs.disks().iter().any(|d| d.writable()) {
        return;
    }
    let _ = std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
        loop {
            std::thread::sleep(CHECKPOINT_INTERVAL);
            for d in fs.disks() {
                // A failed overlay has said why once; it stays failed until remounted.
                if d.overlay().is_some_and(|o| o.is_dirty() && !o.failed())
                    && let Err(e) = d.flush()
                {
                    log::error!("{}: periodic checkpoint failed: {e}", d.name());
                }
            }
        }
    });
}
