//! Bad VHDs: each is refused at open with one line naming the file and the defect, leaves no
//! mount behind, and defects found only while reading give EIO and a log line, never bytes.

use std::path::{Path, PathBuf};

use testkit::vhd::{Dialect, VhdBuilder};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// The VHD checksum, written here independently of the reader.
fn vhd_sum(b: &[u8], skip: usize) -> u32 {
    !b.iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32))
}

/// Edits a file's bytes, then recomputes the footer (both copies) and header checksums.
fn patch(p: &Path, edit: impl FnOnce(&mut Vec<u8>), fix_sums: bool) {
    let mut b = std::fs::read(p).unwrap();
    edit(&mut b);
    if fix_sums {
        let n = b.len();
        for at in [0, n - 512] {
            let s = vhd_sum(&b[at..at + 512], 64);
            b[at + 64..at + 68].copy_from_slice(&s.to_be_bytes());
        }
        let s = vhd_sum(&b[512..1536], 36);
        b[548..552].copy_from_slice(&s.to_be_bytes());
    }
    std::fs::write(p, b).unwrap();
}

fn sample(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut b = VhdBuilder::dynamic(6 * MIB);
    b.write(0, &pattern(1, 4096)).write(4 * MIB, &pattern(2, MIB as usize));
    b.build(&p).unwrap();
    p
}

crate::register!(truncated_dynamic_vhd_is_refused);
fn truncated_dynamic_vhd_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "trunc.vhd");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - MIB).unwrap();
    // The end footer is gone; the copy at offset 0 is used, and the BAT then points past the end.
    refused(&p, &p, &["BAT entry", "past the end"]);
}

crate::register!(truncated_fixed_vhd_is_refused);
fn truncated_fixed_vhd_is_refused() {
    let t = tmpdir();
    let p = t.path().join("fixed.vhd");
    VhdBuilder::fixed(4 * MIB).build(&p).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(3 * MIB).unwrap();
    refused(&p, &p, &["no VHD footer", "truncated"]);
}

crate::register!(bad_checksum_in_both_footer_copies_is_refused);
fn bad_checksum_in_both_footer_copies_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "sum.vhd");
    patch(
        &p,
        |b| {
            let n = b.len();
            b[48] ^= 0x10;
            b[n - 512 + 48] ^= 0x10;
        },
        false,
    );
    refused(&p, &p, &["footer checksum mismatch", "copy at offset 0 is also invalid"]);
}

crate::register!(bad_dynamic_header_checksum_is_refused);
fn bad_dynamic_header_checksum_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "hdr.vhd");
    patch(&p, |b| b[600] ^= 1, false);
    refused(&p, &p, &["dynamic header checksum mismatch"]);
}

crate::register!(bat_entry_past_end_of_file_is_refused);
fn bat_entry_past_end_of_file_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "bat.vhd");
    patch(
        &p,
        |b| {
            let bat = u64::from_be_bytes(b[528..536].try_into().unwrap()) as usize;
            b[bat + 4..bat + 8].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
        },
        false,
    );
    refused(&p, &p, &["BAT entry 1", "past the end"]);
}

crate::register!(impossible_block_sizes_are_refused);
fn impossible_block_sizes_are_refused() {
    for bs in [0u32, 3 << 20, 1 << 30] {
        let t = tmpdir();
        let p = sample(t.path(), "bs.vhd");
        patch(&p, |b| b[544..548].copy_from_slice(&bs.to_be_bytes()), true);
        refused(&p, &p, &["impossible block size", &bs.to_string()]);
    }
}

crate::register!(impossible_virtual_size_is_refused_without_allocating);
fn impossible_virtual_size_is_refused_without_allocating() {
    let t = tmpdir();
    let p = sample(t.path(), "huge.vhd");
    patch(
        &p,
        |b| {
            let n = b.len();
            for at in [0, n - 512] {
                b[at + 48..at + 56].copy_from_slice(&(u64::MAX - 511).to_be_bytes());
            }
        },
        true,
    );
    refused(&p, &p, &["virtual size", "exceeds the VHD maximum"]);
    // 2 TiB is allowed by size, but then the BAT is too small for it.
    patch(
        &p,
        |b| {
            let n = b.len();
            for at in [0, n - 512] {
                b[at + 48..at + 56].copy_from_slice(&(2u64 << 40).to_be_bytes());
            }
        },
        true,
    );
    refused(&p, &p, &["BAT has 3 entries", "needs 1048576"]);
}

crate::register!(poisoned_vhd_is_refused);
fn poisoned_vhd_is_refused() {
    let t = tmpdir();
    let p = sample(t.path(), "poison.vhd");
    patch(
        &p,
        |b| {
            let n = b.len();
            b[0..8].copy_from_slice(b"v_poison");
            b[n - 512..n - 504].copy_from_slice(b"v_poison");
        },
        false,
    );
    refused(&p, &p, &["poisoned"]);
}

fn chain3(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = sample(dir, "base.vhd");
    let mid = dir.join("mid.vhd");
    let mut m = VhdBuilder::differencing(&base).unwrap();
    m.write(MIB, &pattern(3, 4096));
    m.build(&mid).unwrap();
    let top = dir.join("top.vhd");
    let mut c = VhdBuilder::differencing(&mid).unwrap();
    c.write(2 * MIB, &pattern(4, 4096));
    c.build(&top).unwrap();
    (top, mid, base)
}

crate::register!(missing_parent_is_refused_naming_it);
fn missing_parent_is_refused_naming_it() {
    let t = tmpdir();
    let (top, mid, base) = chain3(t.path());
    std::fs::remove_file(&base).unwrap();
    refused(&top, &mid, &["parent not found", "base.vhd"]);
}

crate::register!(parent_with_the_wrong_uuid_is_refused_with_both_uuids);
fn parent_with_the_wrong_uuid_is_refused_with_both_uuids() {
    let t = tmpdir();
    let (top, mid, base) = chain3(t.path());
    let expected = std::fs::read(&base).unwrap()[68..84].to_vec();
    // Replace the base by a different disk of the same name.
    sample(t.path(), "base.vhd");
    let fmt = |u: &[u8]| u.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let want = fmt(&expected);
    let want = format!("{}-{}-{}-{}-{}", &want[0..8], &want[8..12], &want[12..16], &want[16..20], &want[20..]);
    refused(&top, &mid, &["has identity", "expects", &want, "--ignore-parent-id"]);
    // The explicit override opens it.
    let o = vdiskfs([os("info"), os("--ignore-parent-id"), top.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

crate::register!(parent_cycle_is_refused);
fn parent_cycle_is_refused() {
    let t = tmpdir();
    let d = t.path();
    // a.vhd's parent is b.vhd and b.vhd's parent is a.vhd, identities matching.
    let b0 = d.join("b.vhd");
    VhdBuilder::dynamic(4 * MIB).build(&b0).unwrap();
    let b_uuid = std::fs::read(&b0).unwrap()[68..84].try_into().unwrap();
    let a = d.join("a.vhd");
    VhdBuilder::differencing(&b0).unwrap().build(&a).unwrap();
    VhdBuilder::differencing(&a).unwrap().uuid(b_uuid).build(&b0).unwrap();
    let o = vdiskfs([os("info"), a.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("parent cycle"), "{err}");
    if fuse_ok() {
        assert!(try_mount(&[a.as_os_str()]).unwrap_err().contains("parent cycle"));
    }
}

crate::register!(chains_deeper_than_the_limit_are_refused);
fn chains_deeper_than_the_limit_are_refused() {
    let t = tmpdir();
    let (top, _, _) = chain3(t.path());
    let o = vdiskfs([os("info"), os("--max-depth"), os("2"), top.as_os_str()]);
    assert_one_line_error(&o, &top.display().to_string(), &["deeper than 2 layers"]);
}

crate::register!(a_non_image_is_refused_and_usage_errors_exit_2);
fn a_non_image_is_refused_and_usage_errors_exit_2() {
    let t = tmpdir();
    let p = t.path().join("notes.txt");
    std::fs::write(&p, b"hello").unwrap();
    assert_one_line_error(
        &vdiskfs([os("info"), p.as_os_str()]),
        &p.display().to_string(),
        &["not a recognised disk image"],
    );
    let o = vdiskfs([os("mount"), p.as_os_str(), t.path().join("nope").as_os_str()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not an existing directory"));
    let o = vdiskfs(["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

crate::register!(read_time_truncation_gives_eio_and_a_log_line);
/// A defect found only at read time (the file was truncated after the mount) gives EIO for that
/// range and a log line; the rest of the disk still reads.
fn read_time_truncation_gives_eio_and_a_log_line() {
    need_fuse();
    let t = tmpdir();
    let p = t.path().join("live.vhd");
    let mut b = VhdBuilder::dynamic(6 * MIB).dialect(Dialect::Xen);
    b.write(0, &pattern(1, (2 * MIB) as usize)).write(4 * MIB, &pattern(2, (2 * MIB) as usize));
    b.build(&p).unwrap();
    let m = mount(&[p.as_os_str()]);
    let len = std::fs::metadata(&p).unwrap().len();
    // Cut off the second half of the last block (and the footer).
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 512 - MIB).unwrap();
    let raw = m.file("live.raw");
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&raw).unwrap();
    let mut buf = vec![0u8; 65536];
    let e = f.read_at(&mut buf, 5 * MIB + 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &pattern(1, 65536)[..]);
    assert!(wait_for(5, || m.log_text().contains("truncated")), "log: {}", m.log_text());
    assert!(m.log_text().contains("live.vhd"), "log names the file: {}", m.log_text());
}

crate::register!(a_vhd_claiming_billions_of_blocks_is_refused_before_anything_is_allocated);
/// 2 TiB in 512-byte blocks: 2^32 - 1 BAT entries in a sparse 16 GiB file. The open used to
/// allocate a 512 MiB allocation bitmap and read all 16 GiB of BAT; now the block count is
/// refused at once, whatever the file holds.
fn a_vhd_claiming_billions_of_blocks_is_refused_before_anything_is_allocated() {
    let t = tmpdir();
    let p = sample(t.path(), "huge.vhd");
    let blocks: u64 = u32::MAX as u64;
    let footer = std::fs::read(&p).unwrap()[..512].to_vec();
    let mut head = std::fs::read(&p).unwrap()[..1536].to_vec();
    // A new file: footer copy, dynamic header, then a BAT of `blocks` entries (a hole), footer.
    std::fs::write(&p, b"").unwrap();
    let len = 1536 + blocks * 4 + 512;
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len).unwrap();
    let size = blocks * 512;
    head[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    head[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    head[512 + 16..512 + 24].copy_from_slice(&1536u64.to_be_bytes()); // table offset
    head[512 + 28..512 + 32].copy_from_slice(&u32::MAX.to_be_bytes()); // max table entries
    head[512 + 32..512 + 36].copy_from_slice(&512u32.to_be_bytes()); // block size
    let mut tail = footer;
    tail[40..56].copy_from_slice(&head[40..56]);
    for (b, at, skip) in [(&mut head, 0, 64), (&mut tail, 0, 64)] {
        let s = vhd_sum(&b[at..at + 512], skip);
        b[at + skip..at + skip + 4].copy_from_slice(&s.to_be_bytes());
    }
    let s = vhd_sum(&head[512..1536], 36);
    head[548..552].copy_from_slice(&s.to_be_bytes());
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&tail, len - 512).unwrap();
    drop(f);
    let started = std::time::Instant::now();
    refused(&p, &p, &["4294967295 blocks", "at most 16777216"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
}
