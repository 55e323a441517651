//! The sync state: what a target holds, kept in a JSON file beside it
//! (`TARGET.vdiskfs-sync.json`) or where `--state FILE` says.
//!
//! ```json
//! { "format": "vdiskfs-sync", "version": 1,
//!   "target": { "path": "/dev/sdb", "kind": "block device", "rdev": 2064 },
//!   "virtual_size": 21474836480,
//!   "layers": [ { "identity": "vmdk-cid:1a2b3c4d", "format": "vmdk", "path": "/…/vm-000001.vmdk" }, … ],
//!   "fingerprint": "size 21474836480, xxh64 0123456789abcdef",   (of the first and last MiB)
//!   "pending": null, "updated_unix": 1767225600 }
//! ```
//!
//! `layers` are the chain whose content the target holds, top first, each by the identity a
//! child names it with. `pending` is set while a sync writes: the target then holds the old
//! layers, the new ones, or a mix, and only a sync toward the same top may finish it. The file
//! is replaced atomically (a temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old state or the new one.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::SyncError;
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::layer::{Identity, Layer};

/// Written in every state file, so that any other JSON is refused.
const FORMAT: &str = "vdiskfs-sync";
const VERSION: u32 = 1;
/// Bytes at each end of the disk that the fingerprint covers.
const FINGERPRINT_SPAN: u64 = 1 << 20;

/// Which file or device a state belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// As the user named it, made absolute (for messages; identity is the numbers below).
    pub path: String,
    /// "file" or "block device".
    pub kind: String,
    /// A file: its device and inode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// A block device: its device number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
}

impl TargetRecord {
    /// What identifies the object at `path` now.
    pub fn of(path: &Path, md: &std::fs::Metadata) -> TargetRecord {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
        if md.file_type().is_block_device() {
            TargetRecord { path, kind: "block device".into(), dev: None, ino: None, rdev: Some(md.rdev()) }
        } else {
            TargetRecord { path, kind: "file".into(), dev: Some(md.dev()), ino: Some(md.ino()), rdev: None }
        }
    }

    /// Same object: the same kind and numbers, wherever it is named from now.
    pub fn same_object(&self, other: &TargetRecord) -> bool {
        (&self.kind, self.dev, self.ino, self.rdev) == (&other.kind, other.dev, other.ino, other.rdev)
    }

    pub fn describe(&self) -> String {
        match (self.rdev, self.dev, self.ino) {
            (Some(r), _, _) => format!("{} (block device {}:{})", self.path, libc::major(r), libc::minor(r)),
            (None, Some(d), Some(i)) => format!("{} (file, device {d:#x}, inode {i})", self.path),
            _ => self.path.clone(),
        }
    }
}

/// One layer of the chain a target holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// `vhd-uuid:…`, `vhdx-data-write-guid:…` or `vmdk-cid:…`; none for a layer no child can
    /// name (an XVA disk, a VMDK without CID).
    pub identity: Option<String>,
    pub format: String,
    /// Where the layer was read from (for messages).
    pub path: String,
    /// Size and modification time of a VHD file (see [`FileStamp`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

/// What tells a written VHD file apart. A VHDX gets a new DataWriteGuid and a VMDK a new CID
/// when they are written, but a VHD keeps its UUID: XenServer's coalesce writes a snapshot's
/// blocks into its parent in place, and a VM started again writes its leaf. So a VHD layer the
/// target holds must also keep its size and modification time. (A VHD on a block device, as
/// on LVM storage, has none that change: there the UUID is all there is.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
}

impl LayerRecord {
    pub fn of(layer: &dyn Layer) -> LayerRecord {
        let format = layer.describe().map(|d| d.format.to_string()).unwrap_or_default();
        let is_file = layer.location().as_path().and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| m.is_file());
        let stamp = (format == "vhd" && is_file)
            .then(|| layer.sources().first().and_then(|s| s.id()))
            .flatten()
            .map(|id| FileStamp { size: id.size, mtime_ns: id.mtime_ns as i64 });
        LayerRecord {
            identity: layer.identity().first().map(identity_key),
            format,
            path: layer.location().to_string(),
            stamp,
        }
    }

    /// `file name (identity)`, for messages.
    pub fn describe(&self) -> String {
        let name = Path::new(&self.path).file_name().map_or(self.path.clone(), |n| n.to_string_lossy().into_owned());
        format!("{name} ({})", self.identity.as_deref().unwrap_or("no identity"))
    }
}

/// The typed identity as it is written in a state file.
pub fn identity_key(id: &Identity) -> String {
    match id {
        Identity::VhdUuid(_) => format!("vhd-uuid:{id}"),
        Identity::VhdxDataWrite(_) => format!("vhdx-data-write-guid:{id}"),
        Identity::VmdkCid(_) => format!("vmdk-cid:{id}"),
    }
}

/// The records of every layer of `chain`, top first.
pub fn records(chain: &Chain) -> Vec<LayerRecord> {
    chain.layers().iter().map(|l| LayerRecord::of(l.as_ref())).collect()
}

/// A step that began and has not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The chain the step writes toward, top first.
    pub toward: Vec<LayerRecord>,
    pub started_unix: u64,
}

/// What a target holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub version: u32,
    pub target: TargetRecord,
    pub virtual_size: u64,
    /// The chain whose content the target holds, top first.
    pub layers: Vec<LayerRecord>,
    /// Of the target when it last became durable (see [`fingerprint`]).
    pub fingerprint: String,
    pub pending: Option<Pending>,
    pub updated_unix: u64,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl State {
    pub fn new(target: TargetRecord, virtual_size: u64, layers: Vec<LayerRecord>, fingerprint: String) -> State {
        State {
            format: FORMAT.into(),
            version: VERSION,
            target,
            virtual_size,
            layers,
            fingerprint,
            pending: None,
            updated_unix: now_unix(),
        }
    }

    /// Reads the state at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<State>> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot read the sync state", e).in_file(path.display())),
        };
        let st: State = serde_json::from_slice(&text)
            .map_err(|e| Error::from(SyncError::BadState(e.to_string())).in_file(path.display()))?;
        if st.format != FORMAT || st.version != VERSION {
            let e = SyncError::BadState(format!(
                "format {} version {} (this vdiskfs reads {FORMAT} {VERSION})",
                st.format, st.version
            ));
            return Err(Error::from(e).in_file(path.display()));
        }
        Ok(Some(st))
    }

    /// Replaces the state at `path` atomically and durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| {
            Error::io(format!("cannot write the sync state: {what}"), e).in_file(path.display())
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map_or("state".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| fail("encoding", std::io::Error::other(e)))?;
        text.push(b'\n');
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            File::open(&dir)?.sync_all()
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(|e| fail("writing", e))
    }

    /// The top of the chain the target holds.
    pub fn top(&self) -> Option<&LayerRecord> {
        self.layers.first()
    }
}

/// Removes the state at `path` durably (a target about to be overwritten holds nothing known).
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(d).and_then(|f| f.sync_all());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot remove the old sync state", e).in_file(path.display())),
    }
}

/// A cheap fingerprint of a target holding a disk of `size` bytes: its length and a hash of the
/// first and the last MiB of the disk. Anything that writes a partition table, a boot sector, a
/// file system superblock or the GPT backup changes it.
pub fn fingerprint(
    read_at: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
    target_len: u64,
    size: u64,
) -> std::io::Result<String> {
    let mut h = xxhash_rust::xxh64::Xxh64::new(0);
    h.update(&target_len.to_le_bytes());
    h.update(&size.to_le_bytes());
    let n = FINGERPRINT_SPAN.min(size);
    let mut buf = vec![0u8; n as usize];
    read_at(&mut buf, 0)?;
    h.update(&buf);
    read_at(&mut buf, size - n)?;
    h.update(&buf);
    Ok(format!("size {target_len}, xxh64 {:016x}", h.digest()))
}

/// Where the state of `target` lives: `--state FILE`, or `TARGET.vdiskfs-sync.json` beside a
/// file target. `None` for a block device without `--state`.
pub fn default_path(target: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    let is_dev = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if is_dev {
        return None;
    }
    let mut name = target.file_name()?.to_os_string();
    name.push(".vdiskfs-sync.json");
    Some(target.with_file_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_other_json_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.json");
        let tr = TargetRecord { path: "/x".into(), kind: "file".into(), dev: Some(1), ino: Some(2), rdev: None };
        let stamp = Some(FileStamp { size: 1, mtime_ns: -5 });
        let l =
            LayerRecord { identity: Some("vhd-uuid:abc".into()), format: "vhd".into(), path: "/a.vhd".into(), stamp };
        let st = State::new(tr.clone(), 4096, vec![l], "f".into());
        st.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap().unwrap(), st);
        assert!(State::load(&t.path().join("none.json")).unwrap().is_none());
        std::fs::write(&p, br#"{"format":"other","version":1}"#).unwrap();
        assert!(State::load(&p).is_err());
        let rd = TargetRecord { kind: "block device".into(), dev: None, ino: None, rdev: Some(7), ..tr.clone() };
        assert!(!tr.same_object(&rd));
        assert!(tr.same_object(&TargetRecord { path: "/moved".into(), ..tr.clone() }));
    }

    #[test]
    fn fingerprint_sees_the_ends_and_the_size() {
        let disk = vec![7u8; 3 << 20];
        let read = |d: &Vec<u8>| {
            let d = d.clone();
            move |b: &mut [u8], o: u64| {
                b.copy_from_slice(&d[o as usize..o as usize + b.len()]);
                Ok(())
            }
        };
        let f = fingerprint(read(&disk), 3 << 20, 3 << 20).unwrap();
        let mut mid = disk.clone();
        mid[(3 << 19) as usize] = 1;
        assert_eq!(fingerprint(read(&mid), 3 << 20, 3 << 20).unwrap(), f, "the middle is not covered");
        let mut end = disk.clone();
        end[(3 << 20) - 1] = 1;
        assert_ne!(fingerprint(read(&end), 3 << 20, 3 << 20).unwrap(), f);
        assert_ne!(fingerprint(read(&disk), 4 << 20, 3 << 20).unwrap(), f);
    }
}
