//! Shared pieces of the host-to-host migration tests: a source VMM running
//! memtouch and ticker, and a destination whose receive results the test
//! can read.

use std::net::TcpListener;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::remote::{self, ReceiveOptions, RemoteError};
use vmbeam_vmm::vmm::Vmm;

/// A source VMM with host VM `hv0` whose two nested guests have started.
pub fn source(test: &str) -> (Arc<Vmm>, super::TempDir) {
    let dir = temp_dir(&format!("{test}-src"));
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 2,
            workloads: vec![Workload::Memtouch, Workload::Ticker],
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    for g in ["l2-0", "l2-1"] {
        wait_console(&dir, g, Duration::from_secs(60), |t| t.lines().count() >= 3);
    }
    (Arc::new(vmm), dir)
}

/// A destination listening on `bind` (e.g. 127.0.0.1:0); each receive's
/// outcome (the VM's name, or the error) comes out of the channel.
pub fn destination(
    test: &str,
    bind: &str,
    opts: ReceiveOptions,
) -> (
    Arc<Vmm>,
    super::TempDir,
    String,
    mpsc::Receiver<Result<String, RemoteError>>,
) {
    let dir = temp_dir(&format!("{test}-dst"));
    let vmm = Arc::new(vmm(&dir, VmmConfig::default()));
    let l = TcpListener::bind(bind).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let v = vmm.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let r = remote::receive_with(&v.shared, s, &|n| v.has_line(n), &opts).map(|vm| {
                let name = vm.spec.line.clone();
                v.add_line(vm);
                name
            });
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    (vmm, dir, addr, rx)
}

/// The next receive outcome, within 60 s.
pub fn outcome(rx: &mpsc::Receiver<Result<String, RemoteError>>) -> Result<String, RemoteError> {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the destination never finished a receive")
}

/// The source still runs hv0 with both guests and the ticker keeps ticking.
pub fn still_running(vmm: &Vmm, dir: &std::path::Path) {
    let before = console(dir, "l2-1").lines().count();
    wait_console(dir, "l2-1", Duration::from_secs(60), |t| {
        t.lines().count() > before + 1
    });
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), 2);
    assert!(vmm.failure().is_none());
}
