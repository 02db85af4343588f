//! Mutual TLS for the migration stream (rustls with the ring provider).
//!
//! A migration hands the destination a host VM to run and carries guest
//! memory in full, so both ends prove who they are: each side loads a
//! directory with `ca.pem` (the CA it trusts), `cert.pem` (its own chain)
//! and `key.pem` (its private key). The receiver requires a client
//! certificate signed by its CA and finishes the handshake before it reads a
//! single frame; the sender checks the receiver's certificate against the
//! same CA and the host name it dialled. Failures are turned into one
//! sentence that says what is wrong rather than a TLS alert code.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, Error as TlsErr};

use crate::migration::transport::Transport;
use crate::migration::wire;

/// Errors loading TLS material or shaking hands.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the TLS directory is missing or unreadable.
    #[error("TLS directory {dir}: cannot use {file}: {why}")]
    File {
        /// Directory.
        dir: PathBuf,
        /// File name.
        file: &'static str,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the material.
    #[error("TLS directory {dir}: {why}")]
    Config {
        /// Directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// The handshake failed.
    #[error("{0}")]
    Handshake(String),
}

/// Certificates and key loaded from a `--tls-dir`.
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsDir {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsDir, TlsError> {
        let file_err = |file: &'static str, why: String| TlsError::File {
            dir: dir.to_path_buf(),
            file,
            why,
        };
        let certs = |file: &'static str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let p = dir.join(file);
            let v: Vec<_> = CertificateDer::pem_file_iter(&p)
                .map_err(|e| file_err(file, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(file, e.to_string()))?;
            if v.is_empty() {
                return Err(file_err(file, "no certificate in it".into()));
            }
            Ok(v)
        };
        let ca = certs("ca.pem")?;
        let chain = certs("cert.pem")?;
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))
            .map_err(|e| file_err("key.pem", e.to_string()))?;
        let cfg_err = |why: String| TlsError::Config {
            dir: dir.to_path_buf(),
            why,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| cfg_err(format!("ca.pem: {e}")))?;
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| cfg_err(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| cfg_err(format!("cert.pem/key.pem: {e}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| cfg_err(format!("cert.pem/key.pem: {e}")))?;
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The directory this was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How long a handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

fn handshake(
    mut sock: TcpStream,
    mut c: rustls::Connection,
    side: Side,
) -> Result<Transport, TlsError> {
    let _ = sock.set_read_timeout(Some(HANDSHAKE));
    let _ = sock.set_write_timeout(Some(HANDSHAKE));
    while c.is_handshaking() {
        if let Err(e) = c.complete_io(&mut sock) {
            let why = match e
                .get_ref()
                .and_then(|x| x.downcast_ref::<TlsErr>())
                .cloned()
            {
                Some(t) => explain_as(&t, side),
                None if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
                {
                    format!("the TLS handshake did not finish within {HANDSHAKE:?}")
                }
                None => format!("the TLS handshake failed: {e}"),
            };
            // Let the peer read our alert rather than a reset.
            let _ = c.write_tls(&mut sock);
            linger(&sock);
            return Err(TlsError::Handshake(why));
        }
    }
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    c.set_buffer_limit(None);
    Ok(Transport::Tls(sock, Box::new(c)))
}

/// Opens TLS to a receiver at `host` (the name or address dialled, which
/// its certificate must carry).
pub fn connect(t: &TlsDir, sock: TcpStream, host: &str) -> Result<Transport, TlsError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Handshake(format!("'{host}' is not a valid TLS server name")))?;
    let c = rustls::ClientConnection::new(t.client.clone(), name)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    handshake(sock, c.into(), Side::Sender)
}

/// Accepts TLS from a sender, requiring a client certificate from the CA.
/// A sender that starts a plaintext migration stream instead is answered
/// in plaintext (REFUSE), so it can say why too.
pub fn accept(t: &TlsDir, sock: TcpStream) -> Result<Transport, TlsError> {
    if starts_plaintext(&sock) {
        refuse_plaintext(&sock);
        return Err(TlsError::Handshake(explain_as(
            &TlsErr::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            Side::Receiver,
        )));
    }
    let c = rustls::ServerConnection::new(t.server.clone())
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    handshake(sock, c.into(), Side::Receiver)
}

/// True if the first bytes are a plaintext migration frame's magic.
fn starts_plaintext(sock: &TcpStream) -> bool {
    let _ = sock.set_read_timeout(Some(HANDSHAKE));
    let magic = wire::MAGIC.to_le_bytes();
    let mut b = [0u8; 4];
    let deadline = std::time::Instant::now() + HANDSHAKE;
    loop {
        match sock.peek(&mut b) {
            Ok(4) => return b == magic,
            Ok(0) | Err(_) => return false,
            Ok(n) if b[..n] != magic[..n] => return false,
            Ok(_) if std::time::Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn refuse_plaintext(sock: &TcpStream) {
    use std::io::Write;
    let why =
        "this destination requires mutual TLS: give --tls-dir with a certificate signed by its CA";
    let Ok(frame) = wire::encode(wire::Kind::Refuse, wire::refuse_payload(why)) else {
        return;
    };
    let mut s = sock;
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(&frame).is_err() {
        return;
    }
    linger(sock);
}

/// Closes our direction and reads (and drops) what the peer still sends
/// for up to 2 s, so the peer reads what we sent last instead of a reset.
pub(crate) fn linger(sock: &TcpStream) {
    use std::io::Read;
    let mut s = sock;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 64 << 10];
    while std::time::Instant::now() < until {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Sender,
    Receiver,
}

/// One sentence for a TLS failure seen after the handshake.
pub fn explain(e: &TlsErr) -> String {
    explain_as(e, Side::Sender)
}

fn explain_as(e: &TlsErr, side: Side) -> String {
    let peer = match side {
        Side::Sender => "the destination",
        Side::Receiver => "the sender",
    };
    match e {
        TlsErr::NoCertificatesPresented => {
            format!("{peer} presented no TLS certificate; a certificate signed by this host's CA is required")
        }
        TlsErr::InvalidCertificate(CertificateError::UnknownIssuer) => {
            format!("{peer}'s certificate is not signed by the CA this host trusts")
        }
        TlsErr::InvalidCertificate(CertificateError::NotValidForName)
        | TlsErr::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            format!("{peer}'s certificate is not issued for the address that was dialled")
        }
        TlsErr::InvalidCertificate(c) => format!("{peer}'s certificate is not acceptable ({c:?})"),
        TlsErr::AlertReceived(AlertDescription::CertificateRequired) => {
            format!("{peer} requires a TLS client certificate and this side sent none")
        }
        TlsErr::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate) => {
            format!("{peer} does not trust this host's certificate (signed by another CA)")
        }
        TlsErr::AlertReceived(a) => format!("{peer} ended the TLS session ({a:?})"),
        TlsErr::InvalidMessage(_) | TlsErr::InappropriateMessage { .. } => {
            format!(
                "{peer} does not speak TLS (a plaintext migration stream where TLS is required)"
            )
        }
        other => format!("TLS with {peer} failed: {other}"),
    }
}
