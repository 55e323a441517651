//! Bad VHDX files: each is refused at open with one line naming the file and the structure, and
//! leaves no mount behind; defects found only while reading give EIO, never bytes.
//!
//! The builder's layout is fixed (see `testkit::vhdx`): headers at 64/128 KiB, region tables at
//! 192/256 KiB, log at 1 MiB, metadata region at 2 MiB with its items from 2 MiB + 64 KiB in the
//! order File Parameters, Virtual Disk Size, Virtual Disk ID, Logical and Physical Sector Size,
//! BAT at 3 MiB.

use std::path::{Path, PathBuf};

use testkit::vhdx::{LogPlan, VhdxBuilder};

use crate::common::*;

const MIB: u64 = 1 << 20;
const ITEMS: usize = (2 * MIB + (64 << 10)) as usize;
const BAT: usize = (3 * MIB) as usize;

fn sample(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut b = VhdxBuilder::dynamic(6 * MIB).block_size(MIB);
    b.write(0, &pattern(1, 4096)).write(4 * MIB, &pattern(2, MIB as usize));
    b.build(&p).unwrap();
    p
}

/// Edits the file's bytes; `reseal` lists (offset, length) structures whose CRC-32C at +4 is
/// recomputed afterwards (the reader must then find the defect itself, not a checksum).
fn patch(p: &Path, edit: impl FnOnce(&mut Vec<u8>), reseal: &[(usize, usize)]) {
    let mut b = std::fs::read(p).unwrap();
    edit(&mut b);
    for &(at, len) in reseal {
        b[at + 4..at + 8].fill(0);
        let c = crc32c::crc32c(&b[at..at + len]);
        b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
    }
    std::fs::write(p, b).unwrap();
}

crate::register!(both_headers_bad_is_refused);
fn both_headers_bad_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "h.vhdx");
    patch(&p, |b| b[(64 << 10) + 100] ^= 1, &[]);
    // One torn header is fine.
    assert!(vdiskfs([os("info"), p.as_os_str()]).status.success());
    patch(&p, |b| b[(128 << 10) + 100] ^= 1, &[]);
    refused(&p, &p, &["both headers are invalid", "header 1 at 0x10000", "header 2 at 0x20000", "checksum mismatch"]);
}

crate::register!(region_table_crc_mismatch_is_refused);
fn region_table_crc_mismatch_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "r.vhdx");
    patch(&p, |b| b[(192 << 10) + 40] ^= 1, &[]);
    // The copy at 256 KiB is used, and `info` says so.
    let o = vdiskfs([os("info"), p.as_os_str()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("copy 2 (copy at 0x30000 invalid"), "{}", stderr(&o));
    patch(&p, |b| b[(256 << 10) + 40] ^= 1, &[]);
    refused(&p, &p, &["region table checksum mismatch", "0x30000", "copy at 0x40000 is also invalid"]);
}

crate::register!(overlapping_regions_are_refused);
fn overlapping_regions_are_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "overlap.vhdx");
    // Move the BAT region (entry 0 of both region tables) onto the metadata region.
    let rt = [(192usize << 10, 64usize << 10), (256 << 10, 64 << 10)];
    patch(
        &p,
        |b| {
            for (at, _) in rt {
                b[at + 32..at + 40].copy_from_slice(&(2 * MIB).to_le_bytes());
            }
        },
        &rt,
    );
    refused(&p, &p, &["metadata region at 0x200000..0x300000 overlaps the BAT region"]);
}

crate::register!(bat_entry_past_end_of_file_is_refused);
fn bat_entry_past_end_of_file_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "bat.vhdx");
    patch(&p, |b| b[BAT + 8 * 4..BAT + 8 * 5].copy_from_slice(&((900 * MIB) | 6).to_le_bytes()), &[]);
    refused(&p, &p, &["BAT entry 4 (block 4, FULLY_PRESENT)", "past the end of the file"]);
}

crate::register!(bat_entry_overlapping_metadata_is_refused);
fn bat_entry_overlapping_metadata_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "meta.vhdx");
    patch(&p, |b| b[BAT..BAT + 8].copy_from_slice(&((2 * MIB) | 6).to_le_bytes()), &[]);
    refused(&p, &p, &["BAT entry 0 (block 0, FULLY_PRESENT)", "overlaps the metadata region"]);
    patch(&p, |b| b[BAT..BAT + 8].copy_from_slice(&4u64.to_le_bytes()), &[]);
    refused(&p, &p, &["BAT entry 0", "reserved state 4"]);
}

crate::register!(impossible_block_sizes_are_refused);
fn impossible_block_sizes_are_refused() {
    for bs in [0u32, 512 << 10, 3 << 20, 512 << 20] {
        let t = tmpdir();
        let p = sample(t.path(), "bs.vhdx");
        patch(&p, |b| b[ITEMS..ITEMS + 4].copy_from_slice(&bs.to_le_bytes()), &[]);
        refused(&p, &p, &["metadata region at 0x200000", "impossible block size", &bs.to_string()]);
    }
}

crate::register!(logical_sector_sizes_other_than_512_and_4096_are_refused);
fn logical_sector_sizes_other_than_512_and_4096_are_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "lss.vhdx");
    patch(&p, |b| b[ITEMS + 32..ITEMS + 36].copy_from_slice(&1024u32.to_le_bytes()), &[]);
    refused(&p, &p, &["logical sector size 1024", "must be 512 or 4096"]);
}

crate::register!(virtual_size_beyond_64_tib_is_refused);
fn virtual_size_beyond_64_tib_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "huge.vhdx");
    patch(&p, |b| b[ITEMS + 8..ITEMS + 16].copy_from_slice(&((64u64 << 40) + 512).to_le_bytes()), &[]);
    refused(&p, &p, &["virtual disk size", "exceeds the VHDX maximum of 64 TiB"]);
    // 64 TiB itself is allowed by size, but the BAT is far too small for it.
    patch(&p, |b| b[ITEMS + 8..ITEMS + 16].copy_from_slice(&(64u64 << 40).to_le_bytes()), &[]);
    refused(&p, &p, &["BAT region", "needs 67125247"]);
}

crate::register!(a_bad_checksum_in_the_active_log_sequence_is_refused);
fn a_bad_checksum_in_the_active_log_sequence_is_refused() {
    let t = tmpdir();
    let p = t.path().join("dirty.vhdx");
    let mut b = VhdxBuilder::dynamic(8 * MIB).block_size(MIB);
    b.write(MIB, &pattern(1, 4096));
    let plan =
        LogPlan { stale_blocks: vec![1], garbage_bat: true, entries: 3, corrupt_entry: Some(1), ..Default::default() };
    b.pending_log(plan).build(&p).unwrap();
    refused(&p, &p, &["log at 0x100000", "sequence 1001", "checksum mismatch", "sequence 1002", "cannot be replayed"]);
}

crate::register!(a_torn_last_log_entry_is_not_replayed);
fn a_torn_last_log_entry_is_not_replayed() {
    // A crash while the last entry was written: the sequence before it is replayed.
    let t = tmpdir();
    let p = t.path().join("torn-log.vhdx");
    let mut b = VhdxBuilder::dynamic(8 * MIB).block_size(MIB);
    b.write(MIB, &pattern(1, 4096));
    let plan = LogPlan { stale_blocks: vec![1], entries: 2, corrupt_entry: Some(1), ..Default::default() };
    b.pending_log(plan).build(&p).unwrap();
    let o = vdiskfs([os("info"), p.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("replayed in memory: 1 entries, sequence 1000..1000"));
}

fn chain3(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = sample(dir, "base.vhdx");
    let mid = dir.join("base_1.avhdx");
    let mut m = VhdxBuilder::differencing(&base).unwrap();
    m.write(MIB, &pattern(3, 4096));
    m.build(&mid).unwrap();
    let top = dir.join("base_2.avhdx");
    let mut c = VhdxBuilder::differencing(&mid).unwrap();
    c.write(2 * MIB, &pattern(4, 4096));
    c.build(&top).unwrap();
    (top, mid, base)
}

crate::register!(missing_parent_is_refused_naming_it);
fn missing_parent_is_refused_naming_it() {
    let t = tmpdir();
    let (top, mid, base) = chain3(t.path());
    std::fs::remove_file(&base).unwrap();
    refused(&top, &mid, &["parent not found", r"relative_path '.\base.vhdx'", "base.vhdx"]);
}

crate::register!(parent_linkage_mismatch_is_refused_with_both_guids);
fn parent_linkage_mismatch_is_refused_with_both_guids() {
    let t = tmpdir();
    let (top, mid, base) = chain3(t.path());
    let b = std::fs::read(&base).unwrap();
    let dwg: [u8; 16] = b[(128 << 10) + 32..(128 << 10) + 48].try_into().unwrap();
    let want = testkit::vhdx::guid_text(&dwg);
    // Replace the base by a different disk of the same name.
    sample(t.path(), "base.vhdx");
    refused(
        &top,
        &mid,
        &["has identity", "expects", want.trim_matches(|c| c == '{' || c == '}'), "--ignore-parent-id"],
    );
    let o = vdiskfs([os("info"), os("--ignore-parent-id"), top.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

crate::register!(parent_linkage2_is_accepted);
fn parent_linkage2_is_accepted() {
    let t = tmpdir();
    let base = sample(t.path(), "base.vhdx");
    let b = std::fs::read(&base).unwrap();
    let dwg: [u8; 16] = b[(128 << 10) + 32..(128 << 10) + 48].try_into().unwrap();
    let child = t.path().join("merge.avhdx");
    VhdxBuilder::differencing(&base)
        .unwrap()
        .locators(vec![
            ("parent_linkage".into(), "{00000000-1111-2222-3333-444444444444}".into()),
            ("parent_linkage2".into(), testkit::vhdx::guid_text(&dwg)),
            ("relative_path".into(), "base.vhdx".into()),
        ])
        .build(&child)
        .unwrap();
    let o = vdiskfs([os("info"), child.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

crate::register!(a_differencing_disk_without_parent_linkage_is_refused);
fn a_differencing_disk_without_parent_linkage_is_refused() {
    let t = tmpdir();
    let base = sample(t.path(), "base.vhdx");
    let child = t.path().join("nolink.avhdx");
    VhdxBuilder::differencing(&base)
        .unwrap()
        .locators(vec![("relative_path".into(), "base.vhdx".into())])
        .build(&child)
        .unwrap();
    refused(&child, &child, &["parent locator has no valid parent_linkage (missing)"]);
}

crate::register!(truncated_file_is_refused);
fn truncated_file_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "trunc.vhdx");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - MIB / 2).unwrap();
    refused(&p, &p, &["BAT entry 4 (block 4, FULLY_PRESENT)", "past the end of the file"]);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(3000).unwrap();
    refused(&p, &p, &["too small to be a VHDX"]);
}

crate::register!(read_time_truncation_gives_eio_and_a_log_line);
/// A defect found only at read time (the file was truncated after the mount) gives EIO for that
/// range and a log line; the rest of the disk still reads.
fn read_time_truncation_gives_eio_and_a_log_line() {
    need_fuse();
    let t = tmpdir();
    let p = sample(t.path(), "live.vhdx");
    let m = mount(&[p.as_os_str()]);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - MIB / 2).unwrap();
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(m.file("live.raw")).unwrap();
    let mut buf = vec![0u8; 65536];
    let e = f.read_at(&mut buf, 4 * MIB + 900 * 1024).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4096], &pattern(1, 4096)[..]);
    assert!(wait_for(5, || m.log_text().contains("truncated")), "log: {}", m.log_text());
    assert!(m.log_text().contains("live.vhdx"), "log names the file: {}", m.log_text());
}
