//! Who vdiskfs says it is to a web server: basic auth for `--http-user`, with the password from
//! `VDISKFS_HTTP_PASSWORD` or `~/.netrc` (never the command line), and the session cookies the
//! server sets (ESXi opens a session per login unless its cookie comes back).

use std::fmt;
use std::path::PathBuf;

use parking_lot::Mutex;

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// The environment variable that holds the `--http-user` password.
pub const PASSWORD_ENV: &str = "VDISKFS_HTTP_PASSWORD";

/// `$NETRC`, else `~/.netrc`.
fn netrc_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NETRC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".netrc"))
}

/// The password `netrc` text gives `user` on `host`: the `machine host` entry whose login is
/// `user` (or that has no login), else a `default` entry.
pub fn netrc_password(text: &str, host: &str, user: &str) -> Option<Secret> {
    let mut words = text.split_whitespace();
    let mut found: Option<Secret> = None;
    let mut fallback: Option<Secret> = None;
    // (is this entry for the host, is it the default entry, login, password)
    let mut entry: Option<(bool, bool, Option<String>, Option<String>)> = None;
    let mut finish = |e: Option<(bool, bool, Option<String>, Option<String>)>| {
        if let Some((ours, default, login, Some(pw))) = e
            && login.as_deref().is_none_or(|l| l == user)
        {
            if ours && found.is_none() {
                found = Some(Secret(pw));
            } else if default && fallback.is_none() {
                fallback = Some(Secret(pw));
            }
        }
    };
    while let Some(w) = words.next() {
        match w {
            "machine" => {
                finish(entry.take());
                let m = words.next().unwrap_or_default();
                entry = Some((m.eq_ignore_ascii_case(host), false, None, None));
            }
            "default" => {
                finish(entry.take());
                entry = Some((false, true, None, None));
            }
            "login" => {
                if let Some(e) = entry.as_mut() {
                    e.2 = words.next().map(str::to_string);
                }
            }
            "password" => {
                if let Some(e) = entry.as_mut() {
                    e.3 = words.next().map(str::to_string);
                }
            }
            "account" => {
                words.next();
            }
            "macdef" => {
                // A macro runs to an empty line, which split_whitespace cannot see: stop here.
                finish(entry.take());
                break;
            }
            _ => {}
        }
    }
    finish(entry.take());
    found.or(fallback)
}

/// The password for `user` on `host`: `VDISKFS_HTTP_PASSWORD` (already read into `env`), else
/// `~/.netrc`.
pub fn password(env: Option<&Secret>, host: &str, user: &str) -> Result<Secret, String> {
    if let Some(p) = env {
        return Ok(p.clone());
    }
    let path = netrc_path();
    let text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    netrc_password(&text, host, user).ok_or_else(|| {
        format!(
            "--http-user {user}: no password for {host}: set {PASSWORD_ENV}, or add \"machine {host} login {user} password …\" to {}",
            path.map_or("~/.netrc".into(), |p| p.display().to_string())
        )
    })
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, pw: &Secret) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{}", pw.0).into_bytes();
    let mut out = String::from("Basic ");
    for c in raw.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The cookies one server has set, sent back on every request to it.
#[derive(Debug, Default)]
pub struct Cookies(Mutex<Vec<(String, String)>>);

impl Cookies {
    /// Takes in the `Set-Cookie` headers of an answer (name and value; the attributes are not
    /// needed for one server's session).
    pub fn set(&self, headers: &[&str]) {
        if headers.is_empty() {
            return;
        }
        let mut jar = self.0.lock();
        for h in headers {
            let pair = h.split(';').next().unwrap_or_default();
            let Some((name, value)) = pair.split_once('=') else { continue };
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            jar.retain(|(n, _)| *n != name);
            if !value.is_empty() {
                jar.push((name, value));
            }
        }
    }

    /// The `Cookie` header, if any cookie is set.
    pub fn header(&self) -> Option<String> {
        let jar = self.0.lock();
        (!jar.is_empty()).then(|| jar.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netrc_entries_match_host_and_login() {
        let text = "machine other login root password no\n\
                    machine esx.lab login backup password b4ckup\n\
                    machine esx.lab login root password s3cret\n\
                    default login root password fallback\n";
        assert_eq!(netrc_password(text, "esx.lab", "root"), Some(Secret("s3cret".into())));
        assert_eq!(netrc_password(text, "ESX.lab", "backup"), Some(Secret("b4ckup".into())));
        assert_eq!(netrc_password(text, "nowhere", "root"), Some(Secret("fallback".into())));
        assert_eq!(netrc_password(text, "nowhere", "admin"), None);
        assert_eq!(format!("{:?}", Secret("x".into())), "Secret(…)");
    }

    #[test]
    fn basic_auth_and_cookies() {
        assert_eq!(basic("Aladdin", &Secret("open sesame".into())), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(basic("a", &Secret("b".into())), "Basic YTpi");
        let c = Cookies::default();
        assert_eq!(c.header(), None);
        c.set(&["vmware_soap_session=\"52a1\"; Path=/; HttpOnly; Secure", "x=1"]);
        c.set(&["x=2"]);
        assert_eq!(c.header().as_deref(), Some("vmware_soap_session=\"52a1\"; x=2"));
    }
}
