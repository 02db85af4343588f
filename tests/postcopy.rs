//! Post-copy host-to-host migration on real /dev/kvm: the host VM (guest
//! hypervisor, memtouch and ticker) runs on the destination as soon as its
//! state arrived; its pages follow, fetched on demand through userfaultfd
//! or pushed in the background. Over loopback, between two network
//! namespaces joined by a veth pair, and with the link cut in the middle.

mod common;
#[path = "common/migrate.rs"]
#[allow(dead_code)]
mod migrate;

use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use migrate::{destination, outcome, source};
use vmbeam_vmm::migration::remote::postcopy::{PostcopyOutcome, Received};
use vmbeam_vmm::migration::remote::{MigrateOptions, ReceiveOptions, RemoteError};
use vmbeam_vmm::vmm::{Vmm, VmmError};

fn postcopy() -> MigrateOptions {
    MigrateOptions {
        postcopy: true,
        ..Default::default()
    }
}

/// A destination whose post-copy outcomes come out of the second channel.
#[allow(clippy::type_complexity)]
fn pc_destination(
    test: &str,
    bind: &str,
) -> (
    Arc<Vmm>,
    common::TempDir,
    String,
    mpsc::Receiver<Result<String, RemoteError>>,
    mpsc::Receiver<PostcopyOutcome>,
) {
    let (tx, rx) = mpsc::channel();
    let (vmm, dir, addr, outcomes) = destination(
        test,
        bind,
        ReceiveOptions {
            postcopy_outcome: Some(tx),
            ..Default::default()
        },
    );
    (vmm, dir, addr, outcomes, rx)
}

/// The destination's word on the pages, within 120 s.
fn pages_outcome(rx: &mpsc::Receiver<PostcopyOutcome>) -> Result<Received, String> {
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the destination never finished the post-copy")
        .result
}

/// Checks a finished post-copy: the report's counts add up to the whole
/// memory, both sides' digests (each computed on its own side) agree, and
/// the guests run clean on the destination.
fn check_moved(
    r: &vmbeam_vmm::migration::rejuvenate::Report,
    there: &Received,
    dst: &Vmm,
    ddir: &std::path::Path,
    src_dir: &std::path::Path,
) {
    println!("{}", serde_json::to_string(&r.transfer).unwrap());
    let t = r.transfer.as_ref().expect("a transfer block");
    assert_eq!(t.mode, "postcopy");
    let pc = t.postcopy.as_ref().expect("a postcopy block");
    assert_eq!(pc.source_digest, there.digest, "the memory differs");
    assert_eq!(pc.destination.digest, there.digest);
    let total = 32u64 << 20;
    let covered = (pc.fetched_pages + pc.pushed_pages + pc.zero_pages) * 4096;
    assert!(covered >= total, "{covered} bytes covered: {pc:?}");
    assert_eq!(there.fetched_pages, pc.fetched_pages, "{pc:?}");
    assert_eq!(there.pushed_pages, pc.pushed_pages, "{pc:?}");
    assert!(
        there.faults > 0,
        "the VM ran on the destination before its pages arrived, so it faulted: {there:?}"
    );
    assert!(r.guests.iter().all(|g| g.running_after && g.moves == 1));
    // The guests go on where they were and see no corrupted word.
    let last = memtouch_round(&console(src_dir, "l2-0")).unwrap();
    wait_console(ddir, "l2-0", Duration::from_secs(60), |t| {
        memtouch_round(t).is_some_and(|n| n > last + 1)
    });
    assert!(!console(ddir, "l2-0").contains("start mem"));
    assert_memtouch_clean(ddir, "l2-0", "on the destination after post-copy");
    common::moves::check_bulk(&dst.current(None).unwrap(), "l2-0", 0x5eed_0000);
    let st = dst.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].status, "running");
}

#[test]
fn a_host_vm_moves_by_postcopy_over_loopback() {
    if !kvm_or_skip("a_host_vm_moves_by_postcopy_over_loopback") {
        return;
    }
    let (src, sdir) = source("pc-lo");
    let (dst, ddir, addr, outcomes, pages) = pc_destination("pc-lo", "127.0.0.1:0");
    let r = src
        .migrate_with(None, &format!("tcp://{addr}"), &postcopy())
        .unwrap_or_else(|e| {
            panic!(
                "{e}; the destination: {:?}",
                pages.recv_timeout(Duration::from_secs(30))
            )
        });
    assert_eq!(outcome(&outcomes).unwrap(), "hv0");
    let there = pages_outcome(&pages).unwrap();
    assert!(src.status().host_vms.is_empty(), "the source let the VM go");
    check_moved(&r, &there, &dst, &ddir, &sdir);
}

/// Two network namespaces joined by a veth pair, removed on drop (also
/// when the test fails).
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    /// `a` = 10.251.N.1, `b` = 10.251.N.2.
    fn new(tag: &str, n: u8) -> Result<Netns, String> {
        let id = std::process::id();
        let ns = Netns {
            a: format!("vmbeam-{tag}-{id}-a"),
            b: format!("vmbeam-{tag}-{id}-b"),
        };
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        let (va, vb) = (format!("vpa{n}"), format!("vpb{n}"));
        ip(&[
            "link", "add", &va, "netns", &ns.a, "type", "veth", "peer", "name", &vb, "netns", &ns.b,
        ])?;
        for (nsn, dev, addr) in [(&ns.a, &va, 1), (&ns.b, &vb, 2)] {
            ip(&[
                "-n",
                nsn,
                "addr",
                "add",
                &format!("10.251.{n}.{addr}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", nsn, "link", "set", dev, "up"])?;
            ip(&["-n", nsn, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Netns test set-up, or `None` (printed SKIP) where namespaces cannot be
/// made; under VMBEAM_REQUIRE_KVM=1 that fails instead.
fn netns_or_skip(what: &str, tag: &str, n: u8) -> Option<Netns> {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        "network namespaces need root".to_string()
    } else {
        match Netns::new(tag, n) {
            Ok(ns) => return Some(ns),
            Err(e) => e,
        }
    };
    if std::env::var("VMBEAM_REQUIRE_KVM").is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!("{what}: VMBEAM_REQUIRE_KVM=1 but {why}");
    }
    println!("SKIP {what}: {why}");
    None
}

/// Runs `f` on a thread that lives in network namespace `ns` (sockets it
/// makes belong there; the rest of the process is untouched).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file we opened; affects this thread only.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

#[test]
fn a_host_vm_moves_by_postcopy_between_network_namespaces() {
    let what = "a_host_vm_moves_by_postcopy_between_network_namespaces";
    if !kvm_or_skip(what) {
        return;
    }
    let Some(ns) = netns_or_skip(what, "pc", 41) else {
        return;
    };
    let (src, sdir) = source("pc-ns");
    let dst_setup = in_netns(&ns.b, || pc_destination("pc-ns", "10.251.41.2:0"));
    let (dst, ddir, addr, outcomes, pages) = dst_setup.join().unwrap();
    let s = src.clone();
    let r = in_netns(&ns.a, move || {
        s.migrate_with(None, &format!("tcp://{addr}"), &postcopy())
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| {
        panic!(
            "{e}; the destination: {:?}",
            pages.recv_timeout(Duration::from_secs(30))
        )
    });
    assert_eq!(outcome(&outcomes).unwrap(), "hv0");
    let there = pages_outcome(&pages).unwrap();
    check_moved(&r, &there, &dst, &ddir, &sdir);
    drop(ns);
}

#[test]
fn a_link_cut_during_postcopy_is_reported_on_both_sides_and_nothing_hangs() {
    let what = "a_link_cut_during_postcopy_is_reported_on_both_sides_and_nothing_hangs";
    if !kvm_or_skip(what) {
        return;
    }
    let Some(ns) = netns_or_skip(what, "pccut", 42) else {
        return;
    };
    // A slow link, so that the pages are still on their way when it is cut.
    let tc = Command::new("ip")
        .args([
            "netns", "exec", &ns.a, "tc", "qdisc", "add", "dev", "vpa42", "root", "tbf", "rate",
            "16mbit", "burst", "32kbit", "latency", "400ms",
        ])
        .output()
        .expect("tc");
    assert!(
        tc.status.success(),
        "tc: {}",
        String::from_utf8_lossy(&tc.stderr)
    );
    let (src, _sdir) = source("pc-cut");
    let (dst, _ddir, addr, outcomes, pages) =
        in_netns(&ns.b, || pc_destination("pc-cut", "10.251.42.2:0"))
            .join()
            .unwrap();
    let s = src.clone();
    let migrating = in_netns(&ns.a, move || {
        s.migrate_with(None, &format!("tcp://{addr}"), &postcopy())
    });
    // The switch: the destination runs the VM while pages still come.
    assert_eq!(outcome(&outcomes).unwrap(), "hv0");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pages.try_recv().is_err(),
        "the pages all came before the cut; the link is too fast for this test"
    );
    ip(&["-n", &ns.a, "link", "set", "vpa42", "down"]).unwrap();
    let t = Instant::now();
    // The destination reports it and stops the VM.
    let why = pages_outcome(&pages).unwrap_err();
    println!("destination: {why} (after {:?})", t.elapsed());
    let st = dst.status();
    assert_eq!(st.host_vms.len(), 1);
    let status = &st.host_vms[0].status;
    assert!(
        status.starts_with("failed") && status.contains("post-copy"),
        "{status:?}"
    );
    // The source reports it, within its deadlines, and keeps its copy stopped.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !migrating.is_finished() {
        assert!(Instant::now() < deadline, "the source hangs on a dead link");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = migrating.join().unwrap().unwrap_err();
    println!("source: {e} (after {:?})", t.elapsed());
    assert!(
        matches!(&e, VmmError::Remote(RemoteError::PostcopyBroken(_))),
        "{e:?}"
    );
    let st = src.status();
    assert_eq!(st.host_vms.len(), 1, "the source keeps its copy");
    let status = &st.host_vms[0].status;
    assert!(status.starts_with("failed"), "{status:?}");
    drop(ns);
}
