//! Mutual TLS on the migration stream, with throwaway certificates made
//! at test time: a trusted sender moves a host VM; a sender without a
//! certificate, one with a certificate from another CA, and a plaintext
//! sender are refused during the handshake, before the receiver reads any
//! frame, and both sides say why; a plain listener on a non-loopback
//! address is refused unless asked for explicitly.

mod common;
#[path = "common/migrate.rs"]
mod migrate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use migrate::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use vmbeam_vmm::migration::remote::{MigrateOptions, ReceiveOptions, RemoteError};
use vmbeam_vmm::migration::tls::TlsDir;
use vmbeam_vmm::migration::wire;
use vmbeam_vmm::vmm::VmmError;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// Writes DIR/{ca.pem, cert.pem, key.pem}: trusting `trust`, with a leaf
/// for localhost and 127.0.0.1 signed by `signer`.
fn tls_dir(dir: &Path, trust: &Ca, signer: &Ca) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "vmbeam host");
    let cert = p.signed_by(&key, &signer.issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), &trust.pem).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    dir.to_path_buf()
}

fn refused_in_handshake(r: Result<String, RemoteError>, why: &str) {
    match r {
        Err(RemoteError::Tls(m)) => assert!(m.contains(why), "receiver said: {m}"),
        other => panic!("the receiver did not refuse in the TLS handshake: {other:?}"),
    }
}

#[test]
fn only_a_sender_with_a_certificate_from_the_ca_gets_in() {
    if !kvm_or_skip("only_a_sender_with_a_certificate_from_the_ca_gets_in") {
        return;
    }
    let base = temp_dir("tls-certs");
    let ours = ca("vmbeam test CA");
    let other = ca("someone else's CA");
    let dst_dir = tls_dir(&base.join("dst"), &ours, &ours);
    let good = tls_dir(&base.join("good"), &ours, &ours);
    let foreign = tls_dir(&base.join("foreign"), &ours, &other);
    let (src, sdir) = source("tls");
    let (dst, _ddir, addr, results) = destination(
        "tls",
        "127.0.0.1:0",
        ReceiveOptions {
            tls: Some(TlsDir::load(&dst_dir).unwrap()),
            ..Default::default()
        },
    );
    let to = format!("tcp://{addr}");
    let with = |dir: &Path| MigrateOptions {
        downtime: Duration::from_millis(300),
        tls: Some(TlsDir::load(dir).unwrap()),
        ..Default::default()
    };

    // 1. A plaintext sender.
    let e = src
        .migrate(None, &to, Duration::from_millis(300))
        .unwrap_err();
    refused_in_handshake(outcome(&results), "does not speak TLS");
    assert!(e.to_string().contains("TLS"), "sender said: {e}");
    still_running(&src, &sdir);

    // 2. A certificate signed by another CA.
    let e = src.migrate_with(None, &to, &with(&foreign)).unwrap_err();
    refused_in_handshake(outcome(&results), "not signed by the CA this host trusts");
    assert!(
        e.to_string()
            .contains("does not trust this host's certificate"),
        "sender said: {e}"
    );
    still_running(&src, &sdir);

    // 3. No certificate at all: a TLS client that trusts the CA but has no
    // client certificate, speaking the migration protocol.
    {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ours.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn =
            rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
        let sock = std::net::TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        let hello = br#"{"line":"hv9","generation":1,"ram":33554432,"pool":0,"vcpus":1,"slice_us":1,"regions":[]}"#;
        // The write may already fail; the receiver's alert is still there to read.
        let _ = wire::write_frame(&mut s, wire::Kind::Hello, hello);
        let e = wire::read_frame(&mut s).unwrap_err().to_string();
        assert!(e.contains("CertificateRequired"), "client saw: {e}");
        refused_in_handshake(outcome(&results), "presented no TLS certificate");
    }
    assert!(dst.status().host_vms.is_empty(), "nothing was accepted");

    // 4. The trusted sender moves the VM, over TLS.
    let r = src.migrate_with(None, &to, &with(&good)).unwrap();
    assert_eq!(outcome(&results).unwrap(), "hv0");
    let t = r.transfer.as_ref().unwrap();
    assert!(t.tls);
    for g in &r.guests {
        assert!(g.running_after && g.moves == 1, "{g:?}");
    }
    assert_eq!(dst.status().host_vms.len(), 1);
    // Every word of memtouch's bulk arrived, read from outside L0.
    moves::check_bulk(&dst.current(Some("hv0")).unwrap(), "l2-0", 0x5eed_0000);
    assert!(src.status().host_vms.is_empty());
}

#[test]
fn a_tls_sender_is_told_when_the_destination_has_no_tls() {
    if !kvm_or_skip("a_tls_sender_is_told_when_the_destination_has_no_tls") {
        return;
    }
    let base = temp_dir("tls-plain-certs");
    let ours = ca("vmbeam test CA");
    let good = tls_dir(&base.join("good"), &ours, &ours);
    let (src, sdir) = source("tls-plain");
    let (dst, _ddir, addr, results) =
        destination("tls-plain", "127.0.0.1:0", ReceiveOptions::default());
    let e = src
        .migrate_with(
            None,
            &format!("tcp://{addr}"),
            &MigrateOptions {
                downtime: Duration::from_millis(300),
                tls: Some(TlsDir::load(&good).unwrap()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, VmmError::Remote(RemoteError::Tls(_))), "{e}");
    assert!(
        e.to_string().contains("does not speak TLS"),
        "sender said: {e}"
    );
    let r = outcome(&results).unwrap_err();
    assert!(
        r.to_string().contains("TLS handshake"),
        "receiver said: {r}"
    );
    still_running(&src, &sdir);
    assert!(dst.status().host_vms.is_empty());
}

#[test]
fn a_plain_listener_on_a_public_address_needs_insecure_listen() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmbeam"))
        .args(["run", "--listen", "0.0.0.0:0", "--api-sock"])
        .arg(temp_dir("tls-insecure").join("api.sock"))
        .args(["--duration", "0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("without --tls-dir"), "{err}");
    assert!(err.contains("--insecure-listen"), "{err}");
    // A bad TLS directory is named.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmbeam"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            "/nonexistent",
        ])
        .arg("--api-sock")
        .arg(temp_dir("tls-insecure2").join("api.sock"))
        .args(["--duration", "0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent") && err.contains("ca.pem"),
        "{err}"
    );
}
