//! TLS for `https://` sources: rustls, verifying against the system's CA store plus any
//! `--ca-cert`, or, with `--pin-sha256`, accepting exactly the pinned certificates (ESXi's
//! self-signed one) and nothing else. There is no "insecure" mode.
//!
//! A certificate that fails is remembered with its SHA-256, so the error the operator sees can
//! show the fingerprint to pin (as `openssl x509 -noout -fingerprint -sha256` prints it).

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};

/// A SHA-256 certificate fingerprint.
pub type Fingerprint = [u8; 32];

/// Parses a fingerprint: 64 hex digits, with or without colons (`AB:CD:…` or `abcd…`), an
/// optional `sha256 Fingerprint=` prefix as openssl prints it.
pub fn parse_fingerprint(s: &str) -> Option<Fingerprint> {
    let s = s.trim();
    let s = s.rsplit('=').next().unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `AB:CD:…`, as openssl prints a fingerprint.
pub fn show_fingerprint(f: &Fingerprint) -> String {
    f.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

pub fn sha256(der: &[u8]) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Why a certificate was refused, and its fingerprint.
#[derive(Debug, Clone)]
pub struct Refused {
    pub reason: String,
    pub fingerprint: Fingerprint,
}

/// Verifies server certificates and remembers the last one refused.
#[derive(Debug)]
pub struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pins: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
    refused: Mutex<Option<Refused>>,
}

impl Verifier {
    /// The verifier `--ca-cert` and `--pin-sha256` ask for.
    pub fn new(ca_certs: &[PathBuf], pins: &[Fingerprint]) -> Result<Arc<Verifier>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = if pins.is_empty() {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            for f in ca_certs {
                let certs = CertificateDer::pem_file_iter(f)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("--ca-cert {}: {e}", f.display()))?;
                if certs.is_empty() {
                    return Err(format!("--ca-cert {}: no PEM certificate in it", f.display()));
                }
                for c in certs {
                    roots.add(c).map_err(|e| format!("--ca-cert {}: {e}", f.display()))?;
                }
            }
            if roots.is_empty() {
                return Err(format!(
                    "no CA certificates: the system store has none ({added} loaded; install ca-certificates) and no --ca-cert was given"
                ));
            }
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("TLS set-up: {e}"))?;
            Some(v)
        } else {
            None
        };
        Ok(Arc::new(Verifier { webpki, pins: pins.to_vec(), provider, refused: Mutex::new(None) }))
    }

    /// A rustls client configuration that verifies with this.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, String> {
        let cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(cfg)
    }

    /// The last certificate refused, if any (taken).
    pub fn take_refused(&self) -> Option<Refused> {
        self.refused.lock().take()
    }

    fn refuse(&self, cert: &CertificateDer<'_>, reason: String) -> TlsError {
        let r = Refused { reason: reason.clone(), fingerprint: sha256(cert.as_ref()) };
        *self.refused.lock() = Some(r);
        TlsError::General(reason)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(webpki) = &self.webpki else {
            // Pinned: exactly these certificates, whatever their names or dates.
            if self.pins.contains(&sha256(end_entity.as_ref())) {
                return Ok(ServerCertVerified::assertion());
            }
            return Err(self.refuse(end_entity, "the certificate is not the one pinned with --pin-sha256".into()));
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(e) => {
                let why = e.to_string();
                Err(self.refuse(end_entity, why))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_openssl_prints_them() {
        let colons = "sha256 Fingerprint=0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9:0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9";
        let f = parse_fingerprint(colons).unwrap();
        assert_eq!(f[0], 0x0a);
        assert_eq!(f[31], 0xf9);
        assert_eq!(parse_fingerprint(&show_fingerprint(&f).replace(':', "").to_lowercase()), Some(f));
        assert_eq!(show_fingerprint(&f), colons.rsplit('=').next().unwrap());
        assert_eq!(parse_fingerprint("AB:CD"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }
}
