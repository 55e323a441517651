//! vdiskfs-fixture: writes test images (VHD chains in the Windows or XenServer dialect) from raw
//! files, for the demo, the benchmarks and manual testing. Not needed to use vdiskfs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use testkit::vhd::{Dialect, VhdBuilder};

#[derive(Parser)]
#[command(name = "vdiskfs-fixture", about = "Write VHD test images from raw disk files")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum DialectArg {
    Windows,
    Xen,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fixed or dynamic VHD holding RAW (all-zero units are left unallocated).
    Vhd {
        #[arg(long, value_enum, default_value = "xen")]
        dialect: DialectArg,
        #[arg(long)]
        fixed: bool,
        #[arg(long, default_value_t = 4096)]
        unit: u64,
        #[arg(long)]
        from: PathBuf,
        out: PathBuf,
    },
    /// A differencing VHD over PARENT holding the units where NEW differs from OLD.
    Diff {
        #[arg(long, value_enum, default_value = "xen")]
        dialect: DialectArg,
        #[arg(long, default_value_t = 4096)]
        unit: u64,
        #[arg(long)]
        parent: PathBuf,
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        out: PathBuf,
    },
    /// A chain of LAYERS VHDs (DIR/PREFIX-00.vhd is the base, the highest number the top) whose
    /// merged disk equals RAW; non-zero units go round-robin to the layers.
    Chain {
        #[arg(long, value_enum, default_value = "xen")]
        dialect: DialectArg,
        #[arg(long, default_value_t = 1 << 20)]
        unit: u64,
        #[arg(long)]
        layers: usize,
        #[arg(long, default_value = "layer")]
        prefix: String,
        #[arg(long)]
        from: PathBuf,
        dir: PathBuf,
    },
    /// A sparse chain of LAYERS VHDs of virtual size SIZE (suffixes K, M, G, T), each layer
    /// holding WRITES random 64 KiB writes: for mount-time and memory measurements.
    SparseChain {
        #[arg(long, value_enum, default_value = "windows")]
        dialect: DialectArg,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        layers: usize,
        #[arg(long, default_value_t = 16)]
        writes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        dir: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|e| format!("{s}: {e}"))
}

fn dialect(d: DialectArg) -> Dialect {
    match d {
        DialectArg::Windows => Dialect::Windows,
        DialectArg::Xen => Dialect::Xen,
    }
}

/// Calls `f(offset, bytes)` for each unit of `path`.
fn units(path: &Path, unit: u64, mut f: impl FnMut(u64, &[u8])) -> std::io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; unit as usize];
    let mut off = 0;
    while off < len {
        let n = unit.min(len - off) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        f(off, &buf[..n]);
        off += n as u64;
    }
    Ok(len)
}

fn run(cli: Cli) -> std::io::Result<()> {
    match cli.cmd {
        Cmd::Vhd { dialect: d, fixed, unit, from, out } => {
            let len = std::fs::metadata(&from)?.len();
            let mut b = if fixed { VhdBuilder::fixed(len) } else { VhdBuilder::dynamic(len) }.dialect(dialect(d));
            units(&from, unit, |off, data| {
                if data.iter().any(|&x| x != 0) {
                    b.write(off, data);
                }
            })?;
            b.build(&out)
        }
        Cmd::Diff { dialect: d, unit, parent, old, new, out } => {
            let mut b = VhdBuilder::differencing(&parent)?.dialect(dialect(d));
            let old = File::open(old)?;
            let mut ob = vec![0u8; unit as usize];
            units(&new, unit, |off, data| {
                let ob = &mut ob[..data.len()];
                if old.read_exact_at(ob, off).is_err() || ob != data {
                    b.write(off, data);
                }
            })?;
            b.build(&out)
        }
        Cmd::Chain { dialect: d, unit, layers, prefix, from, dir } => {
            std::fs::create_dir_all(&dir)?;
            let len = std::fs::metadata(&from)?.len();
            let mut parent: Option<PathBuf> = None;
            for k in 0..layers {
                let path = dir.join(format!("{prefix}-{k:02}.vhd"));
                let mut b = match &parent {
                    None => VhdBuilder::dynamic(len),
                    Some(p) => VhdBuilder::differencing(p)?,
                }
                .dialect(dialect(d));
                if k + 1 < layers && d == DialectArg::Xen {
                    b = b.hidden(false);
                }
                units(&from, unit, |off, data| {
                    if (off / unit) as usize % layers == k && data.iter().any(|&x| x != 0) {
                        b.write(off, data);
                    }
                })?;
                b.build(&path)?;
                println!("{}", path.display());
                parent = Some(path);
            }
            Ok(())
        }
        Cmd::SparseChain { dialect: d, size, layers, writes, seed, dir } => {
            std::fs::create_dir_all(&dir)?;
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut parent: Option<PathBuf> = None;
            for k in 0..layers {
                let path = dir.join(format!("sparse-{k:02}.vhd"));
                let mut b = match &parent {
                    None => VhdBuilder::dynamic(size),
                    Some(p) => VhdBuilder::differencing(p)?,
                }
                .dialect(dialect(d));
                for w in 0..writes {
                    let off = rnd(size / 65536) * 65536;
                    b.write(off, &testkit::pattern(seed ^ (k as u64) << 20 ^ w, 65536));
                }
                b.build(&path)?;
                parent = Some(path);
            }
            if let Some(p) = parent {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("vdiskfs-fixture: {e}");
        std::process::exit(1);
    }
}
