//! Images made by other writers (qemu-img, FreeBSD mkimg, Windows diskpart).

use crate::common::*;

fn mounted_bytes(img: &std::path::Path) -> Vec<u8> {
    let m = mount(&[img.as_os_str()]);
    std::fs::read(m.file(&format!("{}.raw", img.file_stem().unwrap().to_string_lossy()))).unwrap()
}

crate::register!(vhds_from_other_writers_match_qemu);
fn vhds_from_other_writers_match_qemu() {
    need_fuse();
    need("qemu-img");
    need("xz");
    let t = tmpdir();
    for name in ["img-1x1-512-gpt.vhd.hex", "img-1x1-512-gpt.vhdf.hex", "dfvfs_ext2.vhd.xz", "plaso_image.vhd.xz"] {
        let img = corpus(name, t.path());
        // mkimg's fixed VHD is named .vhdf; qemu's vpc driver reads both kinds.
        assert_same(name, &mounted_bytes(&img), &qemu_raw(&img, "vpc"));
    }
}

crate::register!(windows_differencing_vhd_without_its_parent_is_refused_naming_it);
fn windows_differencing_vhd_without_its_parent_is_refused_naming_it() {
    need("xz");
    let t = tmpdir();
    let img = corpus("dfvfs_fat-differential.vhd.xz", t.path());
    for cmd in ["info", "map"] {
        let o = vdiskfs([os(cmd), img.as_os_str()]);
        assert_one_line_error(&o, &img.display().to_string(), &["parent not found", "fat-parent.vhd"]);
    }
    if fuse_ok() {
        let e = try_mount(&[img.as_os_str()]).expect_err("mount must fail");
        assert!(e.contains("fat-parent.vhd"), "{e}");
    }
}

crate::register!(hand_edited_vhds_with_bad_checksums_are_refused);
fn hand_edited_vhds_with_bad_checksums_are_refused() {
    need("xz");
    let t = tmpdir();
    for name in ["dfvfs_image.vhd.xz", "dfvfs_image-differential.vhd.xz"] {
        let img = corpus(name, t.path());
        let o = vdiskfs([os("info"), img.as_os_str()]);
        assert_one_line_error(&o, &img.display().to_string(), &["footer checksum mismatch", "copy at offset 0"]);
    }
}
