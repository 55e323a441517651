//! Where a source lives: a local path today, a remote URL later. Relative names written inside
//! images (parents, extents) resolve against a [`Location`] lexically, so a relative path on a
//! remote host becomes another location on that host.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Where a source lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file or block device.
    Local(PathBuf),
}

impl Location {
    pub fn local(p: impl Into<PathBuf>) -> Self {
        Location::Local(p.into())
    }

    /// The local path, if this is a local location.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
        }
    }

    /// The directory holding this source.
    pub fn dir(&self) -> Location {
        match self {
            Location::Local(p) => Location::Local(match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            }),
        }
    }

    /// The last path component, as text.
    pub fn file_name(&self) -> String {
        match self {
            Location::Local(p) => p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    /// `self` (a directory) joined with a relative `/`-separated path, normalised lexically
    /// (`.` dropped, `..` pops). `None` when the path climbs above `self`'s root.
    pub fn join(&self, rel: &str) -> Option<Location> {
        match self {
            Location::Local(dir) => normalize(&dir.join(rel)).map(Location::Local),
        }
    }

    /// True when `self` lies inside directory `root` (both lexically normalised).
    pub fn is_within(&self, root: &Location) -> bool {
        match (self, root) {
            (Location::Local(p), Location::Local(r)) => match (normalize(p), normalize(r)) {
                (Some(p), Some(r)) => p.starts_with(r),
                _ => false,
            },
        }
    }

    /// True when something exists at this location.
    pub fn exists(&self) -> bool {
        match self {
            Location::Local(p) => p.exists(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Lexical normalisation: makes the path absolute against the current directory, drops `.`,
/// resolves `..` without touching the filesystem. `None` if `..` climbs above `/`.
/// Symlinks are deliberately not resolved: a symlink placed by the operator is the operator's
/// choice; a locator string written inside an image is not trusted to climb out.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().ok()?.join(p) };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(s) => out.push(s),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_normalises_and_refuses_climbing_above_root() {
        let d = Location::local("/srv/images");
        assert_eq!(d.join("./base.vhd"), Some(Location::local("/srv/images/base.vhd")));
        assert_eq!(d.join("../other/base.vhd"), Some(Location::local("/srv/other/base.vhd")));
        assert_eq!(d.join("../../../../etc/shadow"), None);
    }

    #[test]
    fn is_within_is_lexical() {
        let root = Location::local("/srv/images");
        assert!(Location::local("/srv/images/a/../b.vhd").is_within(&root));
        assert!(!Location::local("/srv/images/../etc/shadow").is_within(&root));
        assert!(!Location::local("/srv/images2/x").is_within(&root));
    }
}
