//! Image writers for tests, benchmarks and the demo. They write real files from a model of the
//! disk, in the dialects real hypervisors use; independent readers (qemu-img, libvhdi) check
//! their output in the test suite so that writer and reader cannot share a misunderstanding.
//! Not used by the daemon.

pub mod faultfs;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod xva;

/// 16 random bytes (a UUID with version 4 bits set).
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut u);
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Deterministic pseudo-random bytes (xorshift), for test data that is not all zeros.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
