//! Where a source lives: a local path, a path on an ssh host, or an `http(s)://` URL. Relative
//! names written inside images (parents, extents) resolve against a [`Location`] lexically, so
//! a relative path on a remote host becomes another location on that host.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::http_url::HttpUrl;

/// Where a source lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file or block device.
    Local(PathBuf),
    /// A file or block device on an ssh host (`ssh://[user@]host[:port]/abs/path`).
    Ssh(SshPath),
    /// A file on a web server (`https://host/path?query`): ESXi's datastore browser, a presigned
    /// object-store URL, a mirror.
    Http(HttpUrl),
}

/// An absolute path on an ssh host. The path is kept as the host spells it: `/vmfs/volumes/…`,
/// or `/C:/Hyper-V/…` for Windows OpenSSH (the drive is then part of the root).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SshPath {
    pub host: SshHost,
    /// Absolute, `/`-separated, lexically normalised.
    pub path: String,
}

/// Who to connect to: what `ssh` is told.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SshHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for SshHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Why an `ssh://` URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("not an ssh:// URL")]
    NotSsh,
    #[error("no host in the URL")]
    NoHost,
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error("the path must be absolute (ssh://host/abs/path, ssh://host/C:/dir/file on Windows)")]
    NotAbsolute,
    #[error("the path climbs above the root")]
    Climbs,
    #[error("bad %-escape in the URL")]
    BadEscape,
    #[error("not an http:// or https:// URL")]
    NotHttp,
    #[error(
        "credentials do not belong in the URL: give --http-user USER, with the password in VDISKFS_HTTP_PASSWORD or ~/.netrc"
    )]
    CredentialsInUrl,
}

impl crate::error::ErrorKind for UrlError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Usage
    }
}

impl Location {
    pub fn local(p: impl Into<PathBuf>) -> Self {
        Location::Local(p.into())
    }

    /// Parses `ssh://[user@]host[:port]/abs/path` (`%XX` escapes decoded; a literal space is
    /// taken as it is). `[v6addr]` brackets a numeric IPv6 host.
    pub fn parse_ssh(url: &str) -> Result<Location, UrlError> {
        let rest = url.strip_prefix("ssh://").ok_or(UrlError::NotSsh)?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (user, hostport) = match auth.rsplit_once('@') {
            Some((u, h)) => (Some(unescape(u)?), h),
            None => (None, auth),
        };
        let (host, port) = host_port(hostport)?;
        let path = unescape(path)?;
        if !path.starts_with('/') {
            return Err(UrlError::NotAbsolute);
        }
        let path = normalize_remote(&path).ok_or(UrlError::Climbs)?;
        Ok(Location::Ssh(SshPath { host: SshHost { user, host, port }, path }))
    }

    /// Parses `http[s]://host[:port]/path[?query]`.
    pub fn parse_http(url: &str) -> Result<Location, UrlError> {
        HttpUrl::parse(url).map(Location::Http)
    }

    /// Parses any URL vdiskfs reads from (`ssh://`, `http://`, `https://`); `None` when `s` is
    /// not one (a local path).
    pub fn parse_url(s: &str) -> Option<Result<Location, UrlError>> {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("ssh://") {
            Some(Location::parse_ssh(s))
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            Some(Location::parse_http(s))
        } else {
            None
        }
    }

    /// The local path, if this is a local location.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            _ => None,
        }
    }

    /// The remote path, if this is a location on an ssh host.
    pub fn as_ssh(&self) -> Option<&SshPath> {
        match self {
            Location::Ssh(s) => Some(s),
            _ => None,
        }
    }

    /// The URL, if this is a location on a web server.
    pub fn as_http(&self) -> Option<&HttpUrl> {
        match self {
            Location::Http(u) => Some(u),
            _ => None,
        }
    }

    /// The directory holding this source.
    pub fn dir(&self) -> Location {
        match self {
            Location::Local(p) => Location::Local(match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            }),
            Location::Ssh(s) => {
                let root = remote_root_len(&s.path);
                let cut = s.path.rfind('/').filter(|&i| i >= root).unwrap_or(root);
                let dir = if cut <= root { s.path[..root.max(1)].to_string() } else { s.path[..cut].to_string() };
                Location::Ssh(SshPath { host: s.host.clone(), path: dir })
            }
            Location::Http(u) => Location::Http(u.dir()),
        }
    }

    /// The last path component, as text.
    pub fn file_name(&self) -> String {
        match self {
            Location::Local(p) => p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            Location::Ssh(s) => s.path.rsplit('/').next().unwrap_or_default().to_string(),
            Location::Http(u) => u.file_name(),
        }
    }

    /// `self` (a directory) joined with a relative `/`-separated path, normalised lexically
    /// (`.` dropped, `..` pops). `None` when the path climbs above `self`'s root.
    pub fn join(&self, rel: &str) -> Option<Location> {
        match self {
            Location::Local(dir) => normalize(&dir.join(rel)).map(Location::Local),
            Location::Ssh(s) => {
                let joined = if rel.starts_with('/') { rel.to_string() } else { format!("{}/{rel}", s.path) };
                let path = normalize_remote(&joined)?;
                Some(Location::Ssh(SshPath { host: s.host.clone(), path }))
            }
            Location::Http(u) => u.join(rel).map(Location::Http),
        }
    }

    /// True when `self` lies inside directory `root` (both lexically normalised), on the same
    /// host as the same user.
    pub fn is_within(&self, root: &Location) -> bool {
        match (self, root) {
            (Location::Local(p), Location::Local(r)) => match (normalize(p), normalize(r)) {
                (Some(p), Some(r)) => p.starts_with(r),
                _ => false,
            },
            (Location::Ssh(p), Location::Ssh(r)) => {
                p.host == r.host
                    && match (normalize_remote(&p.path), normalize_remote(&r.path)) {
                        (Some(p), Some(r)) => {
                            let r = r.trim_end_matches('/');
                            p == r || p.strip_prefix(r).is_some_and(|rest| rest.starts_with('/'))
                        }
                        _ => false,
                    }
            }
            (Location::Http(p), Location::Http(r)) => p.is_within(r),
            _ => false,
        }
    }

    /// True when something exists at this location (remote ones are not asked: false).
    pub fn exists(&self) -> bool {
        match self {
            Location::Local(p) => p.exists(),
            Location::Ssh(_) | Location::Http(_) => false,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Ssh(s) => write!(f, "ssh://{}{}", s.host, s.path),
            Location::Http(u) => write!(f, "{u}"),
        }
    }
}

/// `%XX` escapes decoded.
/// Splits a URL's `host[:port]` (`[v6addr]` brackets a numeric IPv6 host; an empty port is none).
pub(super) fn host_port(hostport: &str) -> Result<(String, Option<u16>), UrlError> {
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').ok_or(UrlError::NoHost)?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => Some(p.parse::<u16>().map_err(|_| UrlError::BadPort(p.into()))?),
        None => None,
    };
    Ok((host, port))
}

fn unescape(s: &str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(UrlError::BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UrlError::BadEscape)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::BadEscape)
}

/// Length of the part of an absolute remote path that `..` cannot climb: `/`, or `/C:` for a
/// Windows drive.
fn remote_root_len(p: &str) -> usize {
    let b = p.as_bytes();
    if b.len() >= 3 && b[0] == b'/' && b[1].is_ascii_alphabetic() && b[2] == b':' && (b.len() == 3 || b[3] == b'/') {
        3
    } else {
        1
    }
}

/// Lexical normalisation of an absolute remote path: `.` dropped, `..` pops, never above the
/// root (`/` or `/C:`). `None` when it would climb above it or is not absolute.
pub fn normalize_remote(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let root = remote_root_len(p);
    let mut parts: Vec<&str> = Vec::new();
    for c in p[root..].split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    let mut out = if root == 1 { String::new() } else { p[..root].to_string() };
    for c in &parts {
        out.push('/');
        out.push_str(c);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
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

    fn ssh(s: &str) -> Location {
        Location::parse_ssh(s).unwrap()
    }

    #[test]
    fn ssh_urls_parse_user_host_port_and_path() {
        let Location::Ssh(s) = ssh("ssh://root@esx:2222/vmfs/volumes/data%20store/vm/vm-000002.vmdk") else { panic!() };
        assert_eq!(s.host, SshHost { user: Some("root".into()), host: "esx".into(), port: Some(2222) });
        assert_eq!(s.path, "/vmfs/volumes/data store/vm/vm-000002.vmdk");
        let l = ssh("ssh://[::1]/C:/Hyper-V/vm/disk_ABC.avhdx");
        assert_eq!(l.to_string(), "ssh://[::1]/C:/Hyper-V/vm/disk_ABC.avhdx");
        assert_eq!(Location::parse_ssh("ssh://host"), Err(UrlError::NotAbsolute));
        assert_eq!(Location::parse_ssh("ssh:///x"), Err(UrlError::NoHost));
        assert_eq!(Location::parse_ssh("ssh://h:99999/x"), Err(UrlError::BadPort("99999".into())));
    }

    #[test]
    fn ssh_paths_resolve_lexically_on_the_same_host() {
        let top = ssh("ssh://xs/var/run/sr-mount/sr1/top.vhd");
        let dir = top.dir();
        assert_eq!(dir, ssh("ssh://xs/var/run/sr-mount/sr1"));
        assert_eq!(top.file_name(), "top.vhd");
        assert_eq!(dir.join("./base.vhd"), Some(ssh("ssh://xs/var/run/sr-mount/sr1/base.vhd")));
        assert_eq!(dir.join("../../../../../etc/shadow"), None);
        assert!(ssh("ssh://xs/var/run/sr-mount/sr1/a/../b.vhd").is_within(&dir));
        assert!(!ssh("ssh://xs/var/run/sr-mount/sr10/b.vhd").is_within(&dir));
        assert!(!ssh("ssh://other/var/run/sr-mount/sr1/b.vhd").is_within(&dir));
        assert!(!Location::local("/var/run/sr-mount/sr1/b.vhd").is_within(&dir));
    }

    #[test]
    fn a_windows_drive_is_part_of_the_root() {
        let top = ssh("ssh://hv/C:/Hyper-V/vm/disk_ABC.avhdx");
        assert_eq!(top.dir(), ssh("ssh://hv/C:/Hyper-V/vm"));
        assert_eq!(top.dir().join("../../x.vhdx"), Some(ssh("ssh://hv/C:/x.vhdx")));
        assert_eq!(top.dir().join("../../../x.vhdx"), None);
        assert_eq!(ssh("ssh://hv/C:/x.vhdx").dir(), ssh("ssh://hv/C:"));
        assert_eq!(ssh("ssh://hv/x.vhdx").dir(), ssh("ssh://hv/"));
    }
}
