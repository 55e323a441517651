//! Crash consistency beyond kill -9: every state a power loss can leave the overlay's file in.
//!
//! A recording layer under the overlay's file logs each write, punch and sync. A power loss at
//! any point keeps everything before the last completed sync, plus any subset of what came
//! after it (the page cache writes back in any order). Each such state is opened and read
//! against a model of the disk: a cluster no operation touched since the last successful
//! checkpoint must hold exactly what that checkpoint covered; any other cluster holds, byte by
//! byte, what it held at that checkpoint or after one of the later operations.

use vdiskfs::overlay::Overlay;

use crate::common::*;
use crate::overlay_io::*;

const CL: u64 = 4096;
const CLUSTERS: u64 = 48;
const SIZE: u64 = CLUSTERS * CL;

/// A tiny deterministic generator (xorshift), so that a failure names a reproducible seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One operation of the workload, and where it sits in the file's op log.
struct Step {
    /// Op-log index when it started and when it returned.
    start: usize,
    end: usize,
    checkpoint: bool,
    /// The disk (the model) after it.
    after: Vec<u8>,
}

/// Runs a random workload of writes, discards and checkpoints on a recorded overlay.
fn workload(seed: u64, ov: &Overlay, rec: &Recorder) -> Vec<Step> {
    let mut rng = Rng(seed);
    let mut model: Vec<u8> = (0..SIZE).map(chain_byte).collect();
    let mut steps = Vec::new();
    for i in 0..40u64 {
        let start = rec.len();
        let kind = rng.below(10);
        let checkpoint = kind == 0 || i == 39;
        if checkpoint {
            ov.checkpoint().unwrap();
        } else {
            let off = rng.below(SIZE - 1);
            let len = (1 + rng.below(3 * CL)).min(SIZE - off);
            if kind <= 2 {
                ov.discard(off, len, &fill).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data = pattern(seed * 100 + i, len as usize);
                ov.write(off, &data, &fill).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        steps.push(Step { start, end: rec.len(), checkpoint, after: model.clone() });
    }
    steps
}

/// `base` with ops applied: what the file holds when exactly these ops reached the disk.
fn apply<'a>(base: &mut [u8], ops: impl Iterator<Item = &'a FileOp>) {
    for op in ops {
        match op {
            FileOp::Write { at, data } => base[*at as usize..*at as usize + data.len()].copy_from_slice(data),
            FileOp::Punch { at, len } => base[*at as usize..(*at + *len) as usize].fill(0),
            FileOp::Sync => {}
        }
    }
}

/// The subsets of `n` unsynced ops to try: all of them when few, else none, all, each op alone
/// lost, each op alone kept, and a bounded random sample.
fn subsets(n: usize, rng: &mut Rng) -> Vec<Vec<bool>> {
    if n <= 6 {
        return (0..1u64 << n).map(|m| (0..n).map(|b| m >> b & 1 == 1).collect()).collect();
    }
    let mut out = vec![vec![false; n], vec![true; n]];
    // Each op alone lost, and each op alone reached the disk: every single write-back reordering.
    for i in 0..n {
        out.push((0..n).map(|b| b != i).collect());
        out.push((0..n).map(|b| b == i).collect());
    }
    out.extend((0..40).map(|_| (0..n).map(|_| rng.below(2) == 1).collect()));
    out
}

/// Checks the disk a crash state shows against the model: `durable` is the disk at the last
/// completed checkpoint, `later` the disk after each operation begun since.
fn check_state(what: &str, got: &[u8], durable: &[u8], later: &[&Vec<u8>]) {
    for c in 0..CLUSTERS as usize {
        let r = c * CL as usize..(c + 1) * CL as usize;
        let touched = later.iter().any(|l| l[r.clone()] != durable[r.clone()]);
        if !touched {
            assert_same(&format!("{what}: cluster {c}, synced and untouched since"), &got[r.clone()], &durable[r]);
            continue;
        }
        if let Some(i) = r.clone().find(|&i| got[i] != durable[i] && later.iter().all(|l| got[i] != l[i])) {
            panic!(
                "{what}: cluster {c} byte {:#x} is {:#04x}: neither synced nor written since",
                i % CL as usize,
                got[i]
            );
        }
    }
}

crate::register!(every_power_loss_state_shows_synced_bytes_and_old_or_new_elsewhere);
/// Builds the crash states of a recorded random workload (all subsets of the unsynced ops when
/// there are at most 6, else the systematic and random ones of [`subsets`]) and checks each
/// against the model.
fn every_power_loss_state_shows_synced_bytes_and_old_or_new_elsewhere() {
    let mut states = 0usize;
    for seed in [0x9e37_79b9_7f4a_7c15u64, 0xdead_beef_cafe_f00d, 0x1234_5678_9abc_def1] {
        let t = tmpdir();
        let p = t.path().join("o.ovl");
        let (ov, rec) = attach_recorded(&p, SIZE, CL);
        let initial = std::fs::read(&p).unwrap();
        let steps = workload(seed, &ov, &rec);
        let ops = rec.ops.lock().clone();
        drop((ov, rec));
        let chain: Vec<u8> = (0..SIZE).map(chain_byte).collect();
        let mut rng = Rng(seed ^ 0x5555);
        let state_path = t.path().join("crash.ovl");
        for k in 0..=ops.len() {
            // Everything up to the last sync before the crash is on the disk.
            let synced = ops[..k].iter().rposition(|o| matches!(o, FileOp::Sync)).map_or(0, |s| s + 1);
            let done = steps.iter().rposition(|s| s.checkpoint && s.end <= k);
            let durable = done.map_or(&chain, |d| &steps[d].after);
            let later: Vec<&Vec<u8>> = steps
                .iter()
                .enumerate()
                .filter(|(j, s)| done.is_none_or(|d| *j > d) && s.start < k)
                .map(|(_, s)| &s.after)
                .collect();
            let mut base = initial.clone();
            apply(&mut base, ops[..synced].iter());
            let pending = &ops[synced..k];
            for keep in subsets(pending.len(), &mut rng) {
                let mut state = base.clone();
                apply(&mut state, pending.iter().zip(&keep).filter(|(_, k)| **k).map(|(o, _)| o));
                std::fs::write(&state_path, &state).unwrap();
                let o = Overlay::attach(&state_path, SIZE, "id", CL, false)
                    .unwrap_or_else(|e| panic!("seed {seed:#x}, crash after op {k}: the overlay must open: {e}"));
                let got = read(&o, 0, SIZE).unwrap_or_else(|e| panic!("seed {seed:#x}, op {k}: read: {e}"));
                check_state(&format!("seed {seed:#x}, crash after op {k}, kept {keep:?}"), &got, durable, &later);
                states += 1;
            }
        }
    }
    eprintln!("checked {states} crash states");
}
