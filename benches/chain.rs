//! Micro-benchmarks of the read path below FUSE: merged-map lookups and chain reads.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;

use testkit::pattern;
use testkit::vhd::{Dialect, VhdBuilder};
use vdiskfs::chain::{Chain, MAP_BLOCK};
use vdiskfs::open::{OpenOptions, open_images};
use vdiskfs::progress::Silent;
use vdiskfs::source::Location;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A chain of `depth` layers over the same 64 MiB of data, 1 MiB stripes round-robin.
fn chain(dir: &Path, depth: usize) -> Arc<Chain> {
    let mut parent: Option<std::path::PathBuf> = None;
    for k in 0..depth {
        let p = dir.join(format!("d{depth}-{k}.vhd"));
        let mut b = match &parent {
            None => VhdBuilder::dynamic(SIZE),
            Some(pp) => VhdBuilder::differencing(pp).unwrap(),
        }
        .dialect(Dialect::Xen);
        for u in (0..SIZE / MIB).filter(|u| *u as usize % depth == k) {
            b.write(u * MIB, &pattern(u, MIB as usize));
        }
        b.build(&p).unwrap();
        parent = Some(p);
    }
    let disks = open_images(&[Location::local(parent.unwrap())], &OpenOptions::default(), &Silent).unwrap();
    disks[0].chain().clone()
}

fn benches(c: &mut Criterion) {
    let t = tempfile::tempdir().unwrap();
    for depth in [1, 16, 64] {
        let ch = chain(t.path(), depth);
        let mut buf = vec![0u8; MIB as usize];
        c.bench_function(&format!("read 1 MiB, depth {depth}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7) % (SIZE / MIB);
                ch.read(i * MIB, &mut buf).unwrap();
                black_box(&buf);
            })
        });
        c.bench_function(&format!("cached block lookup, depth {depth}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7) % (SIZE / MAP_BLOCK);
                black_box(ch.block_extents(i).unwrap());
            })
        });
        c.bench_function(&format!("uncached resolution of 1 MiB, depth {depth}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7) % (SIZE / MAP_BLOCK);
                black_box(ch.extents(i * MAP_BLOCK, MAP_BLOCK).unwrap());
            })
        });
    }
}

criterion_group!(g, benches);
criterion_main!(g);
