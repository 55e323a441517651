//! What an HTTP answer must be to be used, and what a refusal means: `Content-Range`, the
//! version headers (`ETag`, `Last-Modified`, the size), dates, and the errors for 401, 403
//! (an expired presigned URL says so), 404 and the rest.

use super::super::{Refusal, RemoteError};
use crate::source::HttpUrl;

/// One version of a remote file, as its first answer showed it; every later answer must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Version {
    /// `Changed` when `now` is another version (a header missing from either side is not
    /// compared).
    pub fn check(&self, now: &Version) -> Result<(), RemoteError> {
        let differs = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if a != b);
        let mut what = Vec::new();
        if self.size != now.size {
            what.push(format!("size {} → {}", self.size, now.size));
        }
        if differs(&self.etag, &now.etag) {
            what.push(format!("ETag {} → {}", self.etag.as_deref().unwrap_or(""), now.etag.as_deref().unwrap_or("")));
        }
        if differs(&self.last_modified, &now.last_modified) {
            let lm = |v: &Option<String>| v.clone().unwrap_or_default();
            what.push(format!("Last-Modified {} → {}", lm(&self.last_modified), lm(&now.last_modified)));
        }
        if what.is_empty() { Ok(()) } else { Err(RemoteError::Changed { what: what.join(", ") }) }
    }

    /// Seconds since the epoch of `Last-Modified`, or 0.
    pub fn mtime(&self) -> i64 {
        self.last_modified.as_deref().and_then(http_date).unwrap_or(0)
    }
}

/// A `Content-Range`: the range (first and last byte), if any, and the total, if known.
pub type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parses `Content-Range: bytes FIRST-LAST/TOTAL` (or `bytes */TOTAL` on a 416).
pub fn content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a {
                return None;
            }
            Some((a, b))
        }
    };
    Some((range, total))
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn epoch(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    let ok = (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s <= 60;
    ok.then(|| days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

/// An HTTP date, `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110's IMF-fixdate).
pub fn http_date(s: &str) -> Option<i64> {
    let w: Vec<&str> = s.split_whitespace().collect();
    let [_, d, mon, y, hms, "GMT"] = w.as_slice() else { return None };
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let mo = MONTHS.iter().position(|m| m == mon)? as i64 + 1;
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [h, mi, sec] = t.as_slice() else { return None };
    epoch(y.parse().ok()?, mo, d.parse().ok()?, *h, *mi, *sec)
}

/// `20240229T192625Z`, as `X-Amz-Date` and `X-Goog-Date` carry it.
pub fn amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    epoch(n(0..4)?, n(4..6)?, n(6..8)?, n(9..11)?, n(11..13)?, n(13..15)?)
}

/// `2026-11-29 19:02:26 UTC`.
pub fn show_time(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// When a presigned URL stops working: SigV4 (`X-Amz-Date` + `X-Amz-Expires`), Google's
/// equivalent, or SigV2's `Expires`.
pub fn expiry(url: &HttpUrl) -> Option<i64> {
    for p in ["X-Amz", "X-Goog"] {
        let date = url.query_param(&format!("{p}-Date")).and_then(|d| amz_date(&d));
        let secs = url.query_param(&format!("{p}-Expires")).and_then(|e| e.parse::<i64>().ok());
        if let (Some(d), Some(s)) = (date, secs) {
            return Some(d + s);
        }
    }
    url.query_param("Signature").and(url.query_param("Expires")).and_then(|e| e.parse().ok())
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `Code: Message` of an S3-style XML error body.
pub fn s3_message(body: &str) -> Option<String> {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let a = body.find(&open)? + open.len();
        let b = body[a..].find("</")? + a;
        Some(body[a..b].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
        (c, m) => c.or(m),
    }
}

/// The error for an answer with `status` that is not a usable one. `body` is the start of the
/// answer's body (object stores explain themselves there); `user` is `--http-user`.
pub fn status_error(url: &HttpUrl, status: u16, text: &str, body: &str, user: Option<&str>) -> RemoteError {
    let said = s3_message(body).map(|m| format!(" ({m})")).unwrap_or_default();
    let http = |detail: String, kind| RemoteError::Http { detail, kind };
    match status {
        401 => match user {
            Some(u) => http(format!("the server refused the password of {u} (401 {text}){said}"), Refusal::Denied),
            None => http(
                format!(
                    "the server asks for a login (401 {text}): give --http-user USER, with the password in VDISKFS_HTTP_PASSWORD or ~/.netrc"
                ),
                Refusal::Denied,
            ),
        },
        400 | 403 => {
            let expired_at = expiry(url);
            let says_expired = said.to_ascii_lowercase().contains("expired");
            match expired_at {
                Some(t) if says_expired || t < now() => RemoteError::Expired {
                    when: format!("at {}", show_time(t)),
                    said: format!(" ({status} {text}{said})"),
                },
                _ if says_expired => RemoteError::Expired { when: "already".into(), said: said.clone() },
                _ if status == 403 => http(format!("access denied (403 {text}){said}"), Refusal::Denied),
                _ => http(format!("the server refused the request (400 {text}){said}"), Refusal::Other),
            }
        }
        404 | 410 => http(format!("not found on the server ({status} {text})"), Refusal::NotFound),
        _ => http(format!("the server answered {status} {text}{said}"), Refusal::Other),
    }
}

/// Statuses worth asking again for: the server is busy or briefly broken.
pub fn transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(content_range("bytes 0-0/1234"), Some((Some((0, 0)), Some(1234))));
        assert_eq!(content_range("bytes 100-199/*"), Some((Some((100, 199)), None)));
        assert_eq!(content_range("bytes */0"), Some((None, Some(0))));
        assert_eq!(content_range("bytes 5-4/10"), None);
        assert_eq!(content_range("items 0-1/2"), None);
    }

    #[test]
    fn dates_parse_and_show() {
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(amz_date("19941106T084937Z"), Some(784_111_777));
        assert_eq!(show_time(784_111_777), "1994-11-06 08:49:37 UTC");
        assert_eq!(show_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }

    #[test]
    fn an_expired_presigned_url_says_so() {
        let u = HttpUrl::parse(
            "http://s3/b/k?X-Amz-Date=20200101T000000Z&X-Amz-Expires=60&X-Amz-Signature=x&X-Amz-Credential=a",
        )
        .unwrap();
        assert_eq!(expiry(&u), Some(amz_date("20200101T000100Z").unwrap()));
        let body = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>";
        let e = status_error(&u, 403, "Forbidden", body, None).to_string();
        assert!(e.contains("expired at 2020-01-01 00:01:00 UTC") && e.contains("Request has expired"), "{e}");
        let plain = HttpUrl::parse("https://esx/folder/x").unwrap();
        let e = status_error(&plain, 401, "Unauthorized", "", None).to_string();
        assert!(e.contains("--http-user"), "{e}");
        assert!(matches!(
            status_error(&plain, 404, "Not Found", "", None),
            RemoteError::Http { kind: Refusal::NotFound, .. }
        ));
    }

    #[test]
    fn a_new_version_is_seen() {
        let v = Version { size: 10, etag: Some("\"a\"".into()), last_modified: None };
        assert!(v.check(&v.clone()).is_ok());
        let e = v.check(&Version { etag: Some("\"b\"".into()), ..v.clone() }).unwrap_err();
        assert!(e.to_string().contains("changed under us (ETag \"a\" → \"b\")"), "{e}");
        assert!(v.check(&Version { size: 11, ..v.clone() }).is_err());
    }
}
