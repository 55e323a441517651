//! The terminal progress bar: the one [`Progress`] the command layer hands to the engine.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vdiskfs::progress::Progress;

/// A bar on stderr when it is a terminal (and not `--quiet`); otherwise nothing is drawn and
/// notes go to stdout, one per line.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(show: bool) -> Self {
        let target = if show && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn start(&self, label: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_message(label.to_string());
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn set(&self, done: u64) {
        self.bar.set_position(done);
    }
    fn note(&self, line: &str) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
