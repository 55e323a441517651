#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vdiskfs_fuzz::xva_gzip(data));
