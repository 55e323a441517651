//! The overlay on a failing file: a sync error (fsyncgate), running out of space, and a write
//! racing a discard. Each through a recording, fault-injecting layer under the overlay's file.

use std::sync::Arc;
use std::time::Duration;

use vdiskfs::overlay::Overlay;

use crate::common::*;
use crate::overlay_io::*;

const CL: u64 = 4096;
const SIZE: u64 = 64 * CL;

crate::register!(a_failed_sync_fails_every_later_checkpoint_until_reattached);
/// The kernel reports a writeback error once: a second fsync returns success for data that
/// never reached the disk. Whichever sync of a checkpoint fails (phase 1, phase 2 before the
/// map, after the map), every later checkpoint, write and read of a changed cluster fails;
/// reattaching shows the last good checkpoint.
fn a_failed_sync_fails_every_later_checkpoint_until_reattached() {
    for nth in 1..=3u32 {
        let t = tmpdir();
        let p = t.path().join("o.ovl");
        let (ov, rec) = attach_recorded(&p, SIZE, CL);
        ov.write(0, &[1u8; 512], &fill).unwrap();
        ov.checkpoint().unwrap();
        let good = read(&ov, 0, SIZE).unwrap();
        ov.write(8 * CL, &[2u8; 3 * CL as usize], &fill).unwrap();
        ov.write(100, &[3u8; 100], &fill).unwrap();
        rec.fail_sync(nth);
        let e = ov.checkpoint().expect_err("the failing sync is reported");
        assert!(e.to_string().contains("o.ovl"), "sync {nth}: {e}");
        for _ in 0..3 {
            let e = ov.checkpoint().expect_err("a later checkpoint must fail too");
            assert_eq!(e.errno(), libc::EIO, "sync {nth}: {e}");
            assert!(e.to_string().contains("remount"), "sync {nth}: says what to do: {e}");
        }
        let e = ov.write(20 * CL, &[4u8; 10], &fill).expect_err("writes fail after a failed sync");
        assert_eq!(e.errno(), libc::EIO);
        // Clusters changed since the last good checkpoint: unknown on disk, so not served.
        assert_eq!(read(&ov, 8 * CL, CL).unwrap_err().errno(), libc::EIO, "sync {nth}");
        assert_eq!(read(&ov, 0, 512).unwrap_err().errno(), libc::EIO, "sync {nth}");
        // Untouched since: still served.
        assert_eq!(read(&ov, 30 * CL, CL).unwrap(), good[30 * CL as usize..31 * CL as usize]);
        drop((ov, rec)); // the recorder holds the file (and its lock) too
        let ov = Overlay::attach(&p, SIZE, "id", CL, true).unwrap();
        let now = read(&ov, 0, SIZE).unwrap();
        if nth < 3 {
            // The map never reached the file: the clusters the failed checkpoint would have
            // added read as at the last good one; cluster 0, overwritten in place, old or new.
            let r = (8 * CL) as usize..(11 * CL) as usize;
            assert_same(&format!("sync {nth}: after reattach"), &now[r.clone()], &good[r]);
            let mut newer = good.clone();
            newer[100..200].fill(3);
            assert!(now[..CL as usize] == good[..CL as usize] || now[..CL as usize] == newer[..CL as usize]);
        }
        ov.write(20 * CL, &[4u8; 10], &fill).unwrap();
        ov.checkpoint().unwrap();
    }
}

crate::register!(concurrent_checkpoints_cannot_both_miss_a_sync_error);
/// Two checkpoints at once: the kernel reports the error to one sync only. The other must
/// not report success.
fn concurrent_checkpoints_cannot_both_miss_a_sync_error() {
    for round in 0..20 {
        let t = tmpdir();
        let p = t.path().join("o.ovl");
        let (ov, rec) = attach_recorded(&p, SIZE, CL);
        ov.write(0, &vec![5u8; 16 * CL as usize], &fill).unwrap();
        rec.fail_sync(1);
        let ov = Arc::new(ov);
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let ov = ov.clone();
                std::thread::spawn(move || ov.checkpoint().is_ok())
            })
            .collect();
        let ok: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        // One may have finished before the failing one started: then it was right. But after
        // both, the overlay must refuse further checkpoints.
        assert!(ov.checkpoint().is_err(), "round {round}: {ok:?}");
    }
}

crate::register!(a_write_racing_a_discard_is_not_punched_away);
/// discard sets the map to zeros, then punches the file; a write landing in between (on the
/// zeroed cluster) must survive the punch.
fn a_write_racing_a_discard_is_not_punched_away() {
    let t = tmpdir();
    let p = t.path().join("o.ovl");
    let (ov, rec) = attach_recorded(&p, SIZE, CL);
    ov.write(0, &vec![7u8; 8 * CL as usize], &fill).unwrap();
    let ov = Arc::new(ov);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_tx = parking_lot::Mutex::new(Some(go_tx));
    rec.before_punch(move || {
        // Let the writer run, and give it time to land before the punch goes ahead.
        if let Some(tx) = go_tx.lock().take() {
            let _ = tx.send(());
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let w = {
        let ov = ov.clone();
        std::thread::spawn(move || {
            go_rx.recv().unwrap();
            ov.write(2 * CL + 100, &[9u8; 200], &fill).unwrap();
        })
    };
    ov.discard(0, 8 * CL, &fill).unwrap();
    w.join().unwrap();
    let mut want = vec![0u8; 8 * CL as usize];
    want[(2 * CL + 100) as usize..(2 * CL + 300) as usize].fill(9);
    assert_same("after the race", &read(&ov, 0, 8 * CL).unwrap(), &want);
    ov.checkpoint().unwrap();
    drop((ov, rec));
    let ov = Overlay::attach(&p, SIZE, "id", CL, false).unwrap();
    assert_same("after reattach", &read(&ov, 0, 8 * CL).unwrap(), &want);
}

crate::register!(a_partial_write_into_a_zeroed_cluster_never_revives_unsynced_bytes);
/// A discarded cluster, a write into it that a crash undid (its bytes reached the file, the
/// map did not), then a small write: the rest of the cluster reads zeros, not the dead write.
fn a_partial_write_into_a_zeroed_cluster_never_revives_unsynced_bytes() {
    let t = tmpdir();
    let p = t.path().join("o.ovl");
    let ov = Overlay::attach(&p, SIZE, "id", CL, true).unwrap();
    ov.discard(0, 4 * CL, &fill).unwrap();
    ov.checkpoint().unwrap();
    ov.write(CL, &[6u8; 1000], &fill).unwrap();
    // The crash: the data reached the file, the map change did not (a copy of the file now).
    let crashed = t.path().join("crashed.ovl");
    std::fs::copy(&p, &crashed).unwrap();
    drop(ov);
    let ov = Overlay::attach(&crashed, SIZE, "id", CL, true).unwrap();
    assert_eq!(read(&ov, CL, CL).unwrap(), vec![0u8; CL as usize], "the crash undid the write");
    ov.write(CL + 2000, &[8u8; 10], &fill).unwrap();
    let mut want = vec![0u8; CL as usize];
    want[2000..2010].fill(8);
    assert_same("after a small write", &read(&ov, CL, CL).unwrap(), &want);
}

crate::register!(enospc_in_a_write_leaves_each_cluster_old_or_new);
/// A write that runs out of space part-way fails with ENOSPC (not EIO), keeps the overlay
/// usable, and leaves every cluster it touched with its old bytes or its new ones.
fn enospc_in_a_write_leaves_each_cluster_old_or_new() {
    let t = tmpdir();
    let p = t.path().join("o.ovl");
    let (ov, rec) = attach_recorded(&p, SIZE, CL);
    ov.write(4 * CL, &vec![1u8; 2 * CL as usize], &fill).unwrap(); // clusters 4, 5: data
    ov.discard(6 * CL, 2 * CL, &fill).unwrap(); // clusters 6, 7: zeros
    ov.checkpoint().unwrap();
    let before = read(&ov, 0, SIZE).unwrap();
    // Clusters 3..=8: chain, data, data, zero, zero, chain; partial at both ends.
    let (off, len) = (3 * CL + 100, 5 * CL + 200);
    let new = vec![0xeeu8; len as usize];
    for room in [0, 50, CL / 2, CL + 7, 3 * CL] {
        rec.enospc_after(room);
        let e = ov.write(off, &new, &fill).expect_err("out of space");
        assert_eq!(e.errno(), libc::ENOSPC, "room {room}: {e}");
        check_old_or_new(&read(&ov, 0, SIZE).unwrap(), &before, off, &new, room);
        ov.checkpoint().expect("the overlay stays usable after ENOSPC");
        // What a remount would see (the writable overlay holds the lock: through a copy).
        let copy = t.path().join("copy.ovl");
        std::fs::copy(&p, &copy).unwrap();
        let c = Overlay::attach(&copy, SIZE, "id", CL, false).unwrap();
        check_old_or_new(&read(&c, 0, SIZE).unwrap(), &before, off, &new, room);
    }
    // What the failed writes left in the file of a zeroed cluster stays invisible.
    ov.write(6 * CL + 10, &[0x77u8; 5], &fill).unwrap();
    let mut want = vec![0u8; CL as usize];
    want[10..15].fill(0x77);
    assert_same("a zeroed cluster after failed writes", &read(&ov, 6 * CL, CL).unwrap(), &want);
    ov.write(off, &new, &fill).unwrap();
}

/// Every cluster of `got` holds `before` or `before` with `new` written at `off`; a cluster
/// overwritten in place may hold a mix (a torn write), byte by byte old or new.
fn check_old_or_new(got: &[u8], before: &[u8], off: u64, new: &[u8], room: u64) {
    let mut after = before.to_vec();
    after[off as usize..off as usize + new.len()].copy_from_slice(new);
    for (c, ((g, b), a)) in
        got.chunks(CL as usize).zip(before.chunks(CL as usize)).zip(after.chunks(CL as usize)).enumerate()
    {
        if g == b || g == a {
            continue;
        }
        let torn_ok = (4..=5).contains(&c) && g.iter().zip(b).zip(a).all(|((g, b), a)| g == b || g == a);
        assert!(torn_ok, "room {room}: cluster {c} is neither old nor new: {:02x?}", &g[..16]);
    }
}
