#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vdiskfs_fuzz::vmdk_sesparse(data));
