//! The gate: the one place where a name written inside an image (a parent locator, a VMDK extent
//! line) becomes an opened source.
//!
//! A hostile image must not be able to expose `/etc/shadow` or `/dev/sda` through a mount, hang
//! the daemon on a FIFO, or arm `/dev/watchdog`. So every such name passes three checks here:
//! - **confinement**: a relative name must stay, lexically, inside the directory of the image
//!   that names it or a `--parent-dir`; an absolute one is not followed unless the user says
//!   `--trust-locators`. A bare file name is also looked for in those directories, in order.
//! - **symlinks**: a name that is a symlink, or that leads through one (`sub/base.vhd` with
//!   `sub` a link), is followed only when its final target passes the same confinement
//!   (checked on the canonical paths). One exception keeps XenServer LVM storage working:
//!   `/dev/VG_XenStorage-*/VHD-*` names are symlinks to `/dev/dm-*`, so a symlink to a
//!   device-mapper node is accepted where block devices are.
//! - **file type**: only regular files, and block devices where the chain's own top is a block
//!   device or the user passed `--allow-devices`; checked before anything is read and without
//!   blocking (see [`LocalSource::open`]).
//!
//! The files vdiskfs writes for itself in its cache directory (XVA indexes, block caches) are
//! created here too ([`create_private_file`]): new, private, and never through a name someone
//! else placed in that directory.
//!
//! Names on an ssh host pass the same three checks on that host: confinement is lexical on the
//! remote path (a parent or extent resolves on the image's own host, never another); a name
//! leading through a symlink is followed only when the host's `realpath` of it lies inside the
//! image's directory or a remote `--parent-dir` (each also resolved by the host), or is a
//! `/dev/dm-N` node where block devices are allowed; the file type comes from the host's `stat`
//! before anything is opened.
//!
//! Names on a web server (`http(s)://`) resolve against the naming URL's directory on the same
//! server, its query string kept (ESXi's `?dcPath=…&dsName=…`), under the same lexical
//! confinement; absolute names are never followed there (a hypervisor's local path means
//! nothing on its web server), only their file names are looked for. A server has no symlinks
//! to check and serves only files. Presigned URLs are signed per object, so a file the user
//! names with `--layer-url NAME=URL` is opened at that URL instead: the user chose it.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Kind, Result};
use crate::layer::Hint;
use crate::source::remote::{RemoteKind, Remotes};
use crate::source::{FileTypes, LocalSource, Location, Source, SshPath, normalize, normalize_remote};

/// What the user allows beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Extra directories searched for named files (by file name) and allowed as their location.
    pub parent_dirs: Vec<Location>,
    /// Follow absolute or out-of-tree names stored in images.
    pub trust_locators: bool,
    /// Accept block devices as named files even when the chain's top is a regular file.
    pub allow_devices: bool,
}

/// How a candidate location was derived from the names in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundBy {
    /// The stored name itself, resolved against the naming image's directory.
    Locator(String),
    /// The stored name's file name, beside the naming image.
    NameBesideImage,
    /// The stored name's file name, in a `--parent-dir`.
    NameInParentDir,
}

impl FoundBy {
    /// True when the file is where the image says; otherwise `info` says how it was found.
    pub fn as_stored(&self) -> bool {
        matches!(self, FoundBy::Locator(_))
    }
    pub fn describe(&self) -> &'static str {
        match self {
            FoundBy::Locator(_) => "where the image names it",
            FoundBy::NameBesideImage => "by file name beside the image, not where the image names it",
            FoundBy::NameInParentDir => "by file name in a --parent-dir, not where the image names it",
        }
    }
}

/// One place a named file may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub loc: Location,
    pub by: FoundBy,
}

/// The places to try, in order, and the names refused by confinement (for the error message).
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    pub candidates: Vec<Candidate>,
    pub refused: Vec<String>,
}

/// What the gate refuses.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "is a symbolic link to {target}, outside the image's directory and every --parent-dir: refused to follow it (--trust-locators allows it)"
    )]
    SymlinkEscapes { target: String },
    #[error(
        "a presigned URL is signed for one object, so the chain's other files need their own: give --layer-url {name}=URL"
    )]
    NeedsLayerUrl { name: String },
}

impl ErrorKind for GateError {
    fn kind(&self) -> Kind {
        match self {
            GateError::SymlinkEscapes { .. } => Kind::Denied,
            GateError::NeedsLayerUrl { .. } => Kind::Usage,
        }
    }
}

/// The gate for one chain (its top decides whether block devices may be named).
#[derive(Debug, Clone)]
pub struct Gate {
    policy: Arc<Policy>,
    devices: bool,
    remotes: Option<Arc<Remotes>>,
}

impl Gate {
    pub fn new(policy: Arc<Policy>) -> Self {
        let devices = policy.allow_devices;
        Gate { policy, devices, remotes: None }
    }

    /// A gate that can also open names on ssh hosts, through `remotes`.
    pub fn with_remotes(policy: Arc<Policy>, remotes: Arc<Remotes>) -> Self {
        Gate { remotes: Some(remotes), ..Gate::new(policy) }
    }

    fn remotes(&self, loc: &Location) -> Result<&Arc<Remotes>> {
        self.remotes
            .as_ref()
            .ok_or_else(|| Error::internal("a remote name reached a gate without remote access").in_file(loc))
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Opens the top of a chain, named by the user: a regular file or a block device. Files the
    /// image names may then be block devices if the top is one.
    pub fn open_top(&self, loc: &Location) -> Result<(Gate, Arc<dyn Source>)> {
        match loc {
            Location::Local(p) => {
                let src = LocalSource::open(p, FileTypes::RegularOrBlockDevice)?;
                let gate = Gate { devices: self.devices || src.is_block_device(), ..self.clone() };
                Ok((gate, Arc::new(src)))
            }
            Location::Ssh(p) => {
                let src = self.remotes(loc)?.open(p, FileTypes::RegularOrBlockDevice)?;
                let gate = Gate { devices: self.devices || src.stat().kind == RemoteKind::BlockDevice, ..self.clone() };
                Ok((gate, src))
            }
            Location::Http(u) => Ok((self.clone(), self.remotes(loc)?.open_http(u)?)),
        }
    }

    /// The places a file named by `hints` (written inside an image living in `base_dir`) may be
    /// looked for, in order: each relative hint against `base_dir`; each hint's file name in
    /// `base_dir`; then in every `--parent-dir`.
    pub fn lookup(&self, base_dir: &Location, hints: &[Hint]) -> Lookup {
        let p = &self.policy;
        let mut out = Lookup::default();
        let push = |loc: Location, by: FoundBy, out: &mut Lookup| {
            if !out.candidates.iter().any(|c| c.loc == loc) {
                out.candidates.push(Candidate { loc, by })
            }
        };
        for h in hints {
            let path = unixify(&h.path);
            if path.is_empty() {
                continue;
            }
            if is_absolute(&path) {
                if p.trust_locators {
                    let abs = match base_dir {
                        // On an ssh host, an absolute name stays on that host (`C:/x` → `/C:/x`).
                        Location::Ssh(_) if !path.starts_with('/') => base_dir.join(&format!("/{path}")),
                        Location::Ssh(_) => base_dir.join(&path),
                        Location::Local(_) => path.starts_with('/').then(|| Location::local(&path)),
                        Location::Http(_) => None,
                    };
                    if let Some(l) = abs {
                        push(l, FoundBy::Locator(h.kind.clone()), &mut out);
                    }
                }
                continue;
            }
            match base_dir.join(&path) {
                Some(l) if p.trust_locators || self.confined(&l, base_dir) => {
                    push(l, FoundBy::Locator(h.kind.clone()), &mut out)
                }
                _ => out.refused.push(format!("{} {}", h.kind, h.path)),
            }
        }
        let names: Vec<String> = hints.iter().filter_map(|h| base_name(&unixify(&h.path))).collect();
        for n in &names {
            if let Some(l) = base_dir.join(n) {
                push(l, FoundBy::NameBesideImage, &mut out);
            }
        }
        for dir in &p.parent_dirs {
            for n in &names {
                if let Some(l) = dir.join(n) {
                    push(l, FoundBy::NameInParentDir, &mut out);
                }
            }
        }
        out
    }

    /// True when `loc` lies (lexically) in `base_dir` or a `--parent-dir`.
    fn confined(&self, loc: &Location, base_dir: &Location) -> bool {
        loc.is_within(base_dir) || self.policy.parent_dirs.iter().any(|d| loc.is_within(d))
    }

    /// Opens a candidate found by [`Gate::lookup`] for an image in `base_dir`. `Ok(None)` when
    /// nothing exists there (the next candidate is tried); an error when something exists but is
    /// refused or unreadable.
    pub fn open_named(&self, c: &Candidate, base_dir: &Location) -> Result<Option<Arc<dyn Source>>> {
        match &c.loc {
            Location::Local(p) => {
                if std::fs::symlink_metadata(p).is_err() {
                    return Ok(None);
                }
                if !self.policy.trust_locators {
                    // Any symlink on the way counts, not only the last name: `sub/base.vhd`
                    // with `sub` a link to `/etc` must not pass as "inside the directory".
                    let Ok(target) = std::fs::canonicalize(p) else { return Ok(None) };
                    if normalize(p).is_none_or(|lexical| lexical != target) {
                        self.check_symlink(p, &target, base_dir).map_err(|e| e.in_file(&c.loc))?;
                    }
                }
                Ok(Some(Arc::new(LocalSource::open(p, self.accept())?)))
            }
            Location::Ssh(p) => self.open_remote(p, base_dir),
            Location::Http(u) => {
                let r = self.remotes(&c.loc)?;
                let u = match r.layer_url(&u.file_name()) {
                    Some(named) => named,
                    None if u.is_presigned() => {
                        return Err(Error::from(GateError::NeedsLayerUrl { name: u.file_name() }).in_file(&c.loc));
                    }
                    None => u,
                };
                match r.open_http(u) {
                    Ok(src) => Ok(Some(src)),
                    Err(e) if e.kind() == Kind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn accept(&self) -> FileTypes {
        if self.devices { FileTypes::RegularOrBlockDevice } else { FileTypes::RegularOnly }
    }

    /// [`Gate::open_named`] on an ssh host: `lstat`, then `realpath` for a symlink, then open.
    fn open_remote(&self, p: &SshPath, base_dir: &Location) -> Result<Option<Arc<dyn Source>>> {
        let loc = Location::Ssh(p.clone());
        let r = self.remotes(&loc)?;
        if r.lstat(p)?.is_none() {
            return Ok(None);
        }
        if !self.policy.trust_locators {
            // As locally: a symlink anywhere on the way, not only the last name.
            let target = match r.realpath(p) {
                Ok(t) => t,
                Err(e) if e.kind() == Kind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if normalize_remote(&p.path).is_none_or(|lexical| lexical != target.path) {
                self.check_remote_symlink(r, &target, base_dir).map_err(|e| e.in_file(&loc))?;
            }
        }
        Ok(Some(r.open(p, self.accept())?))
    }

    /// A remote symlink's target (the host's realpath) must lie in the realpath of the image's
    /// directory or of a `--parent-dir` on the same host, or be a device-mapper node where block
    /// devices are allowed (XenServer LVM names).
    fn check_remote_symlink(&self, r: &Remotes, target: &SshPath, base_dir: &Location) -> Result<()> {
        let roots = std::iter::once(base_dir).chain(self.policy.parent_dirs.iter());
        let inside = roots.filter_map(|d| d.as_ssh()).filter(|d| d.host == target.host).any(|d| {
            let t = Location::Ssh(target.clone());
            r.realpath(d).is_ok_and(|real| t.is_within(&Location::Ssh(real)))
        });
        let dm = normalize_remote(&target.path).is_some_and(|t| {
            t.strip_prefix("/dev/dm-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        if inside || (self.devices && dm) {
            return Ok(());
        }
        Err(Error::from(GateError::SymlinkEscapes { target: Location::Ssh(target.clone()).to_string() }))
    }

    /// A symlink's final target must pass the confinement that its name passed, compared on
    /// canonical paths; a device-mapper node is accepted where block devices are (LVM names).
    fn check_symlink(&self, link: &Path, target: &Path, base_dir: &Location) -> Result<()> {
        let roots = std::iter::once(base_dir).chain(self.policy.parent_dirs.iter());
        let inside = roots
            .filter_map(|r| r.as_path())
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|r| normalize(target).is_some_and(|t| t.starts_with(&r)));
        if inside || (self.devices && is_device_mapper_node(target)) {
            return Ok(());
        }
        log::debug!("{}: symlink to {} refused", link.display(), target.display());
        Err(Error::from(GateError::SymlinkEscapes { target: target.display().to_string() }))
    }
}

/// Creates a new file `name` in `dir`, a directory vdiskfs keeps its own files in (indexes,
/// block caches), for reading and writing: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600. `dir` and
/// any missing parents are created with mode 0700. Whatever is already at the name, a symlink
/// planted in a shared cache directory included, makes this fail (`EEXIST`), so nothing is ever
/// written through a name someone else chose; the caller picks another name or does without.
pub fn create_private_file(dir: &Path, name: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    check_private_name(name)?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
}

/// Opens `name` in `dir` (see [`create_private_file`]) for reading, without following a symlink
/// at that name (`ELOOP`), and only if it is a file of this user's that no one else may write
/// and that has no other name (`EACCES` otherwise): a file someone else placed or linked there
/// is never read back as vdiskfs's own.
pub fn open_private_file(dir: &Path, name: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    check_private_name(name)?;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(dir.join(name))?;
    let md = f.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !md.is_file() || md.uid() != me || md.mode() & 0o022 != 0 || md.nlink() != 1 {
        let why = format!(
            "not a private file of this user (uid {}, mode {:o}, {} links)",
            md.uid(),
            md.mode() & 0o7777,
            md.nlink()
        );
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why));
    }
    Ok(f)
}

/// Why `dir` should not hold files that vdiskfs reads back later (indexes), if it should not:
/// it is not a directory, another user owns it, or others may write to it (and so replace what
/// is in it). `None` for a directory of this user's that only it may write, and for one that does
/// not exist yet ([`create_private_file`] makes it, mode 0700).
pub fn private_dir_problem(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() {
        Some("is not a directory".to_string())
    } else if md.uid() != me {
        Some(format!("belongs to uid {}, not to this user (uid {me})", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        let who = if md.mode() & 0o002 != 0 { "every user" } else { "its group" };
        Some(format!("is writable by {who} (mode {:o})", md.mode() & 0o7777))
    } else {
        None
    }
}

/// A private file's name is one path component.
fn check_private_name(name: &str) -> std::io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{name:?} is not a file name")));
    }
    Ok(())
}

/// `/dev/dm-N`: where LVM's `/dev/VG/LV` and `/dev/mapper/*` names lead.
fn is_device_mapper_node(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.parent() == Some(Path::new("/dev"))
        && name.strip_prefix("dm-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Windows separators to `/`, `file://` URLs to paths.
fn unixify(p: &str) -> String {
    let p = p.trim_end_matches('\0').trim();
    let p = p.strip_prefix("file://").unwrap_or(p);
    p.replace('\\', "/")
}

fn is_absolute(p: &str) -> bool {
    let b = p.as_bytes();
    p.starts_with('/') || (b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic())
}

fn base_name(p: &str) -> Option<String> {
    let n = p.rsplit('/').next()?;
    let n = if n.len() >= 2 && n.as_bytes()[1] == b':' { &n[2..] } else { n };
    (!n.is_empty() && n != "." && n != "..").then(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(kind: &str, path: &str) -> Hint {
        Hint { kind: kind.into(), path: path.into() }
    }

    fn gate(p: Policy) -> Gate {
        Gate::new(Arc::new(p))
    }

    fn locs(l: &Lookup) -> Vec<String> {
        l.candidates.iter().map(|c| c.loc.to_string()).collect()
    }

    #[test]
    fn lookup_follows_relative_then_names_then_parent_dirs() {
        let g = gate(Policy { parent_dirs: vec![Location::local("/pd")], ..Default::default() });
        let l =
            g.lookup(&Location::local("/img"), &[hint("W2ku", r"C:\VMs\base.vhd"), hint("W2ru", r".\sub\base.vhd")]);
        assert_eq!(locs(&l), ["/img/sub/base.vhd", "/img/base.vhd", "/pd/base.vhd"]);
        assert_eq!(l.candidates[0].by, FoundBy::Locator("W2ru".into()));
        assert_eq!(l.candidates[2].by, FoundBy::NameInParentDir);
        assert!(l.refused.is_empty());
    }

    #[test]
    fn lookup_refuses_climbing_out_unless_trusted() {
        let hints = [hint("MacX", "file://../../etc/shadow"), hint("W2ku", "/dev/sda")];
        let l = gate(Policy::default()).lookup(&Location::local("/srv/img"), &hints);
        assert_eq!(locs(&l), ["/srv/img/shadow", "/srv/img/sda"]);
        assert_eq!(l.refused, ["MacX file://../../etc/shadow"]);
        let l =
            gate(Policy { trust_locators: true, ..Default::default() }).lookup(&Location::local("/srv/img"), &hints);
        let c = locs(&l);
        assert!(c.contains(&"/etc/shadow".to_string()) && c.contains(&"/dev/sda".to_string()));
    }

    #[test]
    fn a_symlink_is_followed_only_inside_the_confinement() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("real.vhd"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.join("real.vhd"), dir.join("inside.vhd")).unwrap();
        std::fs::write(t.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), dir.join("outside.vhd")).unwrap();
        let g = gate(Policy::default());
        let base = Location::local(&dir);
        let by = FoundBy::NameBesideImage;
        let open = |n: &str| g.open_named(&Candidate { loc: base.join(n).unwrap(), by: by.clone() }, &base);
        assert!(open("inside.vhd").unwrap().is_some());
        let e = open("outside.vhd").unwrap_err();
        assert!(e.to_string().contains("symbolic link") && e.kind() == Kind::Denied, "{e}");
        assert!(open("missing.vhd").unwrap().is_none());
        // A directory on the way that is a symlink out of the confinement counts as well.
        std::os::unix::fs::symlink(t.path(), dir.join("sub")).unwrap();
        let e = open("sub/secret").unwrap_err();
        assert!(e.to_string().contains("symbolic link") && e.kind() == Kind::Denied, "{e}");
        std::os::unix::fs::symlink(&dir, dir.join("here")).unwrap();
        assert!(open("here/real.vhd").unwrap().is_some(), "a link that stays inside is fine");
    }

    #[test]
    fn private_files_are_created_new_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache/sub");
        let f = create_private_file(&dir, "a").unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(create_private_file(&dir, "a").unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        // A symlink planted at the name, to an existing file and to a missing one.
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("planted")).unwrap();
        std::os::unix::fs::symlink(t.path().join("missing"), dir.join("dangling")).unwrap();
        assert!(create_private_file(&dir, "planted").is_err());
        assert!(create_private_file(&dir, "dangling").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!t.path().join("missing").exists(), "a dangling symlink's target is not created");
        assert!(open_private_file(&dir, "planted").is_err(), "reading does not follow it either");
        assert!(open_private_file(&dir, "a").is_ok());
        assert!(create_private_file(&dir, "../escape").is_err());
        // A file with a second name, or that others may write, is not read back.
        std::fs::hard_link(dir.join("a"), t.path().join("other-name")).unwrap();
        assert_eq!(open_private_file(&dir, "a").unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        std::fs::remove_file(t.path().join("other-name")).unwrap();
        std::fs::set_permissions(dir.join("a"), std::fs::Permissions::from_mode(0o622)).unwrap();
        assert_eq!(open_private_file(&dir, "a").unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn a_directory_others_may_write_is_no_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        assert_eq!(private_dir_problem(&t.path().join("missing")), None);
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(private_dir_problem(&d), None);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(private_dir_problem(&d).unwrap(), "is writable by every user (mode 1777)");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert_eq!(private_dir_problem(&d).unwrap(), "is writable by its group (mode 770)");
    }
}
