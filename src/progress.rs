//! Progress of long operations (export, check, indexing an archive), reported to whatever the
//! command layer passes in: a terminal bar there, nothing in tests and in the daemon.

/// Receives progress. Implementations must be cheap to call from several threads.
pub trait Progress: Send + Sync {
    /// A new task of `total` bytes begins (replacing any previous one).
    fn start(&self, label: &str, total: u64);
    /// `n` more bytes are done.
    fn advance(&self, n: u64);
    /// `done` bytes are done in all (for scans that know their position, not their steps).
    fn set(&self, done: u64);
    /// A line to show without disturbing the bar (a bad range found by `check`).
    fn note(&self, line: &str);
    /// The task is over: the bar goes away.
    fn finish(&self);
}

/// Reports nothing; notes go to the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _label: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn set(&self, _done: u64) {}
    fn note(&self, line: &str) {
        log::info!("{line}");
    }
    fn finish(&self) {}
}
