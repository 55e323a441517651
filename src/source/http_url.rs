//! `http://` and `https://` locations. The path is kept percent-encoded exactly as given (a
//! presigned URL's signature covers it), and only dot segments are resolved. Names written
//! inside images (parents, extents) are joined onto the directory of the URL that names them,
//! encoded, and the query string is kept (ESXi's `?dcPath=…&dsName=…` names the datastore).
//!
//! Shown to the user, and used for cache keys, a URL leaves out the query parameters that sign
//! it (`X-Amz-Signature`, `X-Amz-Date`, …): they are credentials, and they change every time
//! the same object is presigned again.

use std::fmt;

use super::location::{UrlError, host_port};

/// Where to connect: scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpOrigin {
    pub tls: bool,
    /// Lowercase; an IPv6 address without its brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl HttpOrigin {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 443 } else { 80 })
    }
}

impl fmt::Display for HttpOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "https://" } else { "http://" })?;
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

/// A file (or, as a `--parent-dir`, a directory) on a web server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpUrl {
    pub origin: HttpOrigin,
    /// Absolute and percent-encoded, as the server is asked for it; dot segments resolved.
    pub path: String,
    /// The query string without its `?`, kept as given.
    pub query: Option<String>,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port]/path[?query]` (a `#fragment` is dropped). A user or
    /// password in the URL is refused: credentials never go on the command line.
    pub fn parse(url: &str) -> Result<HttpUrl, UrlError> {
        let (tls, rest) = if let Some(r) = strip_prefix_ci(url, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "http://") {
            (false, r)
        } else {
            return Err(UrlError::NotHttp);
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (auth, tail) = rest.split_at(end);
        if auth.contains('@') {
            return Err(UrlError::CredentialsInUrl);
        }
        let (host, port) = host_port(auth)?;
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (tail, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        check_escapes(path)?;
        let path = resolve_dots(path).ok_or(UrlError::Climbs)?;
        Ok(HttpUrl { origin: HttpOrigin { tls, host: host.to_ascii_lowercase(), port }, path, query })
    }

    /// The URL as it is requested, signature and all.
    pub fn request_url(&self) -> String {
        match &self.query {
            Some(q) => format!("{}{}?{q}", self.origin, self.path),
            None => format!("{}{}", self.origin, self.path),
        }
    }

    /// The directory holding this file (its query kept).
    pub fn dir(&self) -> HttpUrl {
        let cut = self.path.rfind('/').unwrap_or(0);
        let path = if cut == 0 { "/".to_string() } else { self.path[..cut].to_string() };
        HttpUrl { path, ..self.clone() }
    }

    /// The last path segment, decoded.
    pub fn file_name(&self) -> String {
        let last = self.path.rsplit('/').next().unwrap_or_default();
        decode(last)
    }

    /// `self` (a directory) joined with a relative `/`-separated name written inside an image
    /// (encoded here), the query kept. `None` when it climbs above the root.
    pub fn join(&self, rel: &str) -> Option<HttpUrl> {
        let enc = encode_path(rel);
        let joined = if rel.starts_with('/') { enc } else { format!("{}/{enc}", self.path.trim_end_matches('/')) };
        Some(HttpUrl { path: resolve_dots(&joined)?, ..self.clone() })
    }

    /// True when `self` lies inside directory `root` on the same server.
    pub fn is_within(&self, root: &HttpUrl) -> bool {
        let r = root.path.trim_end_matches('/');
        self.origin == root.origin
            && (self.path == r || self.path.strip_prefix(r).is_some_and(|rest| rest.starts_with('/')))
    }

    /// The value of query parameter `name` (case-insensitive), decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            k.eq_ignore_ascii_case(name).then(|| decode(&v.replace('+', " ")))
        })
    }

    /// True when the query carries a signature (a presigned object-store URL).
    pub fn is_presigned(&self) -> bool {
        self.query.as_deref().is_some_and(|q| q.split('&').any(|kv| is_signing_param(kv, q)))
    }

    /// The query without the parameters that sign it: what is shown and what keys the cache.
    pub fn shown_query(&self) -> Option<String> {
        let q = self.query.as_deref()?;
        let kept: Vec<&str> = q.split('&').filter(|kv| !kv.is_empty() && !is_signing_param(kv, q)).collect();
        (!kept.is_empty()).then(|| kept.join("&"))
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.origin, self.path)?;
        if let Some(q) = self.shown_query() {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// A query parameter that signs a URL: AWS SigV4 and SigV2, Google, Azure SAS.
fn is_signing_param(kv: &str, whole: &str) -> bool {
    let k = kv.split('=').next().unwrap_or_default().to_ascii_lowercase();
    let azure = whole.split('&').any(|p| p.to_ascii_lowercase().starts_with("sig="));
    k.starts_with("x-amz-")
        || k.starts_with("x-goog-")
        || matches!(k.as_str(), "signature" | "awsaccesskeyid" | "expires")
        || (azure && matches!(k.as_str(), "sig" | "se" | "st" | "sp" | "sv" | "sr" | "spr" | "ss" | "srt" | "skoid"))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
        .then(|| &s[prefix.len()..])
}

fn check_escapes(p: &str) -> Result<(), UrlError> {
    let b = p.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let escape = || b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
        if (c == b'%' && !escape()) || c <= b' ' || c == 0x7f {
            return Err(UrlError::BadEscape);
        }
    }
    Ok(())
}

/// Resolves `.` and `..` segments of an absolute path, keeping everything else (empty segments
/// included: an object key may hold `//`). `None` when `..` climbs above the root.
fn resolve_dots(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    if !segs.iter().any(|s| *s == "." || *s == "..") {
        return Some(p.to_string());
    }
    let mut out: Vec<&str> = Vec::new();
    let last = segs.len() - 1;
    for (i, s) in segs.iter().enumerate() {
        match *s {
            "." if i == last => out.push(""),
            "." => {}
            ".." => {
                out.pop()?;
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// Percent-encodes a path written inside an image, keeping `/` and the characters a path
/// segment may hold as they are.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$'()*,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` escapes decoded (bad escapes kept as they are).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%').then(|| s.get(i + 1..i + 3)).flatten();
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> HttpUrl {
        HttpUrl::parse(s).unwrap()
    }

    #[test]
    fn esxi_urls_keep_their_query_on_parents() {
        let top = u("https://ESX:8443/folder/vm%20one/vm-000002.vmdk?dcPath=ha-datacenter&dsName=ds1");
        assert_eq!(top.origin, HttpOrigin { tls: true, host: "esx".into(), port: Some(8443) });
        assert_eq!(top.file_name(), "vm-000002.vmdk");
        let base = top.dir().join("vm 000001.vmdk").unwrap();
        assert_eq!(
            base.request_url(),
            "https://esx:8443/folder/vm%20one/vm%20000001.vmdk?dcPath=ha-datacenter&dsName=ds1"
        );
        assert_eq!(base.to_string(), base.request_url(), "nothing signs an ESXi URL");
        assert!(base.is_within(&top.dir()));
        assert!(!top.dir().join("../other/x.vmdk").unwrap().is_within(&top.dir()));
        assert_eq!(top.dir().join("../../../x"), None);
        assert_eq!(top.query_param("dsname").as_deref(), Some("ds1"));
    }

    #[test]
    fn presigned_urls_are_requested_verbatim_and_shown_without_their_signature() {
        let s = "http://127.0.0.1:9000/bucket/a//b.vmdk?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=k%2F2024&X-Amz-Date=20240229T192625Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=abc";
        let p = u(s);
        assert_eq!(p.request_url(), s);
        assert!(p.is_presigned());
        assert_eq!(p.to_string(), "http://127.0.0.1:9000/bucket/a//b.vmdk");
        assert_eq!(p.query_param("x-amz-credential").as_deref(), Some("k/2024"));
        assert!(!u("https://h/x?dcPath=a&dsName=b").is_presigned());
    }

    #[test]
    fn bad_urls_are_refused() {
        assert_eq!(HttpUrl::parse("https://root:pw@esx/x"), Err(UrlError::CredentialsInUrl));
        assert_eq!(HttpUrl::parse("https:///x"), Err(UrlError::NoHost));
        assert_eq!(HttpUrl::parse("https://h:99999/x"), Err(UrlError::BadPort("99999".into())));
        assert_eq!(HttpUrl::parse("https://h/%zz"), Err(UrlError::BadEscape));
        assert_eq!(HttpUrl::parse("https://h/../x"), Err(UrlError::Climbs));
        assert_eq!(HttpUrl::parse("ftp://h/x"), Err(UrlError::NotHttp));
        assert_eq!(u("https://h").path, "/");
        assert_eq!(u("https://[::1]:8/a/./b#frag").to_string(), "https://[::1]:8/a/b");
    }
}
