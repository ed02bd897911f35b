//! TLS for agent-to-agent links: rustls configs (TLS 1.3, mutual X.509) from PEM files,
//! the peer-identity check behind the recovery agent's allow-list, and a lab CA with host
//! certificates (`bulwark agent certs`).
//!
//! Identity: a host is who its certificate's DNS subject-alternative names say (rcgen puts
//! the host name there and in the CN). The recovery agent verifies the client chain
//! against its CA during the handshake, then checks that the certificate is valid for the
//! host name the `Hello` claims; only then is the allow-list consulted.
//!
//! Certificates from one's own PKI work the same; with openssl, for a lab:
//! ```text
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
//!   -subj "/CN=Bulwark lab CA" -keyout ca.key -out ca.pem \
//!   -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
//! openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=HOST" \
//!   -keyout HOST.key -out HOST.csr
//! openssl x509 -req -in HOST.csr -CA ca.pem -CAkey ca.key -days 825 -out HOST.pem \
//!   -extfile <(printf 'subjectAltName=DNS:HOST\nextendedKeyUsage=serverAuth,clientAuth')
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Everything that can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The three PEM files an agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This host's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This host's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The file names `generate_host_cert` writes in `dir` for `host_name`.
    pub fn in_dir(dir: &Path, host_name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_CERT),
            cert: dir.join(format!("{host_name}.pem")),
            key: dir.join(format!("{host_name}.key")),
        }
    }
}

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
const CA_NAME: &str = "Bulwark lab CA";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store
            .add(c)
            .map_err(|e| TlsError::Config(format!("CA {}: {e}", ca.display())))?;
    }
    Ok(Arc::new(store))
}

/// Server side (recovery agent): TLS 1.3 only, client certificates required and verified
/// against the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Client side (protected agent): TLS 1.3 only, the server verified against the CA, this
/// host's certificate presented.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Whether `cert` (already chain-verified by the handshake) names `host_name` among its
/// DNS subject-alternative names.
pub fn cert_names_host(cert: &CertificateDer<'_>, host_name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host_name) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The parameters of the lab CA. The DN must be the same when signing as when the CA
/// was created (the issuer field is taken from it), so it is built in one place.
fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

fn write_file(path: &Path, body: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if private {
        o.mode(0o600);
    }
    let io = |context, source| TlsError::Io {
        context,
        path: path.to_path_buf(),
        source,
    };
    let mut f = o.open(path).map_err(|e| io("create", e))?;
    f.write_all(body.as_bytes()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))
}

/// Creates a lab CA in `dir`: `ca.pem` and `ca.key` (mode 0600). Overwrites.
pub fn generate_ca(dir: &Path) -> Result<TlsFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io {
        context: "create",
        path: dir.to_path_buf(),
        source: e,
    })?;
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = ca_params()?
        .self_signed(&key)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    write_file(&dir.join(CA_CERT), &cert.pem(), false)?;
    write_file(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    Ok(TlsFiles {
        ca: dir.join(CA_CERT),
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    })
}

/// Issues a certificate for `host_name` signed by the CA in `ca_dir` (from
/// [`generate_ca`]) and writes `<host>.pem`, `<host>.key` and a copy of `ca.pem` in
/// `dir`. The certificate names the host as CN and DNS SAN, plus `extra_names` (DNS
/// names or IP addresses, e.g. the address peers dial), and is good for both TLS server
/// and client authentication: every agent is both.
pub fn generate_host_cert(
    ca_dir: &Path,
    host_name: &str,
    extra_names: &[String],
    dir: &Path,
) -> Result<TlsFiles, TlsError> {
    if ServerName::try_from(host_name).is_err() {
        return Err(TlsError::Generate(format!(
            "{host_name:?} is not a valid DNS host name"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io {
        context: "create",
        path: dir.to_path_buf(),
        source: e,
    })?;
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| TlsError::Io {
        context: "read",
        path: ca_key_path.clone(),
        source: e,
    })?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
        path: ca_key_path,
        reason: e.to_string(),
    })?;
    let ca_params = ca_params()?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut names = vec![host_name.to_string()];
    names.extend(extra_names.iter().cloned());
    let mut p =
        rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, host_name);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let files = TlsFiles::in_dir(dir, host_name);
    write_file(&files.cert, &cert.pem(), false)?;
    write_file(&files.key, &key.serialize_pem(), true)?;
    if ca_dir.join(CA_CERT) != files.ca {
        let ca_pem_path = ca_dir.join(CA_CERT);
        let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(|e| TlsError::Io {
            context: "read",
            path: ca_pem_path,
            source: e,
        })?;
        write_file(&files.ca, &ca_pem, false)?;
    }
    Ok(files)
}

/// What `bulwark agent certs` runs: a CA in `dir` (unless one is there already) and a
/// certificate per host name; returns the files of each host.
pub fn lab_certs(dir: &Path, host_names: &[String]) -> Result<Vec<TlsFiles>, TlsError> {
    if !dir.join(CA_KEY).exists() {
        generate_ca(dir)?;
    }
    host_names
        .iter()
        .map(|h| generate_host_cert(dir, h, &[], dir))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lab_certs_load_and_name_their_host() {
        let d = tempfile::tempdir().unwrap();
        let files = lab_certs(d.path(), &["pro-1".into(), "rec-1".into()]).unwrap();
        server_config(&files[1]).unwrap();
        client_config(&files[0]).unwrap();
        let cert = load_certs(&files[0].cert).unwrap().remove(0);
        assert!(cert_names_host(&cert, "pro-1"));
        assert!(!cert_names_host(&cert, "rec-1"));
        assert!(generate_host_cert(d.path(), "not a name", &[], d.path()).is_err());
    }
}
