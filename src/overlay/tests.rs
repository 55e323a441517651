use super::*;

fn fill_pattern(off: u64, buf: &mut [u8]) -> Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((off + i as u64) % 251) as u8;
    }
    Ok(())
}

fn read(ov: &Overlay, off: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for r in ov.runs(off, len) {
        let b = &mut out[(r.start - off) as usize..(r.start - off + r.len) as usize];
        match r.state {
            ClusterState::Chain => fill_pattern(r.start, b).unwrap(),
            ClusterState::Data => ov.read_data(r.start, b).unwrap(),
            ClusterState::Zero => b.fill(0),
            ClusterState::Invalid => panic!("invalid"),
        }
    }
    out
}

#[test]
fn small_writes_merge_with_the_chain_and_survive_reattach() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("o.ovl");
    let size = 1 << 20;
    let mut model = vec![0u8; size as usize];
    fill_pattern(0, &mut model).unwrap();
    {
        let ov = Overlay::attach(&p, size, "id", 4096, true).unwrap();
        ov.write(1000, &[7u8; 512], &fill_pattern).unwrap();
        model[1000..1512].fill(7);
        ov.discard(8192, 3 * 4096 + 100, &fill_pattern).unwrap();
        model[8192..8192 + 3 * 4096 + 100].fill(0);
        ov.write(8192 + 4096 + 10, &[9u8; 20], &fill_pattern).unwrap();
        model[8192 + 4096 + 10..8192 + 4096 + 30].fill(9);
        assert_eq!(read(&ov, 0, size), model);
        ov.checkpoint().unwrap();
    }
    let ov = Overlay::attach(&p, size, "id", 4096, true).unwrap();
    assert_eq!(read(&ov, 0, size), model);
    assert!(Overlay::attach(&t.path().join("o2"), size, "id", 4096, true).is_ok());
    drop(ov);
    let e = Overlay::attach(&p, size, "other", 4096, true).unwrap_err();
    assert!(e.to_string().contains("different disk"), "{e}");
}

#[test]
fn unsynced_map_changes_are_not_in_the_file() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("o.ovl");
    let ov = Overlay::attach(&p, 1 << 20, "id", 4096, true).unwrap();
    ov.write(0, &[1u8; 4096], &fill_pattern).unwrap();
    let on_disk = std::fs::read(&p).unwrap();
    assert_eq!(on_disk[HEADER as usize], 0, "the map reaches the file only at a checkpoint");
    ov.checkpoint().unwrap();
    assert_eq!(std::fs::read(&p).unwrap()[HEADER as usize], 1);
    std::mem::forget(ov); // simulate a crash: no drop-time checkpoint
}
