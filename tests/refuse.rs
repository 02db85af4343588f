//! A destination that refuses a migration says why, and the sender reports
//! that reason (not a reset connection): a host VM of that name already
//! runs there, a stream of another protocol version, a VM too large for
//! its memory. The source keeps running each time.

mod common;
#[path = "common/migrate.rs"]
mod migrate;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use migrate::*;
use vmbeam_vmm::migration::remote::ReceiveOptions;
use vmbeam_vmm::migration::wire::{self, Kind};

#[test]
fn the_sender_prints_the_destinations_reason() {
    if !kvm_or_skip("the_sender_prints_the_destinations_reason") {
        return;
    }
    let (src, sdir) = source("refuse");
    let (dst, _ddir, addr, results) =
        destination("refuse", "127.0.0.1:0", ReceiveOptions::default());
    // A host VM named hv0 already runs on the destination.
    dst.start("hv0").unwrap();
    let e = src
        .migrate(None, &format!("tcp://{addr}"), Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the destination refused the migration: incoming migration rejected: a host VM named hv0 already runs here"),
        "sender said: {e}"
    );
    assert!(outcome(&results).is_err());
    still_running(&src, &sdir);

    // A stream of another version: the receiver names the version.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut frame = wire::encode(Kind::Hello, b"{}").unwrap();
    frame[4] = 1;
    std::io::Write::write_all(&mut s, &frame).unwrap();
    let (k, p) = wire::read_frame(&mut s).unwrap();
    assert_eq!(k, Kind::Refuse);
    let why = wire::parse_reason(&p);
    assert!(why.contains("version 1 is not supported"), "{why}");
    assert!(outcome(&results).is_err());

    // More memory than the destination has.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = serde_json::json!({
        "line": "big", "generation": 1, "ram": 16u64 << 20, "pool": 28u64 << 30,
        "vcpus": 1, "slice_us": 10000,
        "regions": [
            {"kind": "ram", "guest": null, "gpa": 0, "size": 16u64 << 20},
            {"kind": "pool", "guest": null, "gpa": vmbeam_abi::layout::POOL_BASE, "size": 28u64 << 30},
            {"kind": "channel", "guest": null, "gpa": vmbeam_abi::layout::CHANNEL_BASE,
             "size": vmbeam_abi::layout::CHANNEL_SIZE}
        ]
    });
    wire::write_frame(&mut s, Kind::Hello, hello.to_string().as_bytes()).unwrap();
    let (k, p) = wire::read_frame(&mut s).unwrap();
    assert_eq!(k, Kind::Refuse);
    let why = wire::parse_reason(&p);
    assert!(why.contains("not enough memory here"), "{why}");
    assert!(outcome(&results).is_err());
    assert_eq!(
        dst.status().host_vms.len(),
        1,
        "only its own hv0 runs there"
    );
}
