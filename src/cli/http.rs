//! The options for images on web servers (`http://`, `https://`), shared by every command that
//! opens IMAGEs.

use std::path::PathBuf;

use clap::Args;

use vdiskfs::source::remote::http::{HttpOptions, PASSWORD_ENV, Secret, parse_fingerprint};
use vdiskfs::source::{HttpUrl, Location};
use vdiskfs::{Error, Result};

/// TLS, credentials and presigned layer URLs for remote images over HTTP(S).
#[derive(Debug, Args, Clone)]
pub struct HttpArgs {
    /// HTTP(S) images: log in (basic auth) as USER. The password comes from the environment
    /// variable VDISKFS_HTTP_PASSWORD, else from ~/.netrc; never from the command line.
    #[arg(long, value_name = "USER")]
    pub http_user: Option<String>,
    /// HTTPS images: also trust the CA certificates in FILE (PEM), beside the system's.
    /// Repeatable.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Vec<PathBuf>,
    /// HTTPS images: trust exactly the server certificate whose SHA-256 is FP, whatever its
    /// issuer, name or dates (a self-signed ESXi certificate), instead of any CA. FP is hex, with
    /// or without colons, as `openssl x509 -noout -fingerprint -sha256` prints it. Repeatable.
    #[arg(long, value_name = "FP")]
    pub pin_sha256: Vec<String>,
    /// HTTP(S) images: the file the chain names NAME (a parent or a VMDK extent, by file name)
    /// is at URL. Presigned object-store URLs are signed per object, so each file of the chain
    /// needs its own. Repeatable.
    #[arg(long, value_name = "NAME=URL")]
    pub layer_url: Vec<String>,
    /// HTTP(S) images: connections per server.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub http_connections: usize,
}

impl HttpArgs {
    pub fn options(&self) -> Result<HttpOptions> {
        if self.http_connections == 0 || self.http_connections > 32 {
            return Err(Error::usage("--http-connections must be between 1 and 32"));
        }
        let pins = self
            .pin_sha256
            .iter()
            .map(|p| {
                parse_fingerprint(p).ok_or_else(|| {
                    Error::usage(format!("--pin-sha256 {p}: not a SHA-256 fingerprint (64 hex digits, colons allowed)"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for f in &self.ca_cert {
            if !f.is_file() {
                return Err(Error::usage(format!("--ca-cert {}: not a file", f.display())));
            }
        }
        let layer_urls = self.layer_url.iter().map(|l| layer_url(l)).collect::<Result<Vec<_>>>()?;
        let password = match std::env::var(PASSWORD_ENV) {
            Ok(p) if self.http_user.is_some() => Some(Secret(p)),
            _ => None,
        };
        Ok(HttpOptions {
            user: self.http_user.clone(),
            password,
            ca_certs: self.ca_cert.clone(),
            pins,
            layer_urls,
            connections: self.http_connections,
            ..HttpOptions::default()
        })
    }
}

/// `NAME=URL`: a file name and the http(s) URL it is read from.
fn layer_url(arg: &str) -> Result<(String, HttpUrl)> {
    let bad = |why: &str| Error::usage(format!("--layer-url {}: {why}", shown(arg)));
    let (name, url) = arg.split_once('=').ok_or_else(|| bad("expected NAME=URL"))?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(bad("NAME must be a file name"));
    }
    match Location::parse_url(url) {
        Some(Ok(Location::Http(u))) => Ok((name.to_string(), u)),
        Some(Err(e)) => Err(bad(&e.to_string())),
        _ => Err(bad("URL must be http:// or https://")),
    }
}

/// `NAME=URL` with the URL's signature left out (an argument may be echoed in an error).
fn shown(arg: &str) -> String {
    match arg.split_once('=') {
        Some((n, u)) => match HttpUrl::parse(u) {
            Ok(u) => format!("{n}={u}"),
            Err(_) => format!("{n}=…"),
        },
        None => arg.to_string(),
    }
}
