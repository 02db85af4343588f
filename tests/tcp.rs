//! Host-to-host migration over TCP (loopback): a whole host VM with its
//! nested guests moves to another VMM by pre-copy; corrupted or truncated
//! streams are refused and the source keeps running.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::vmm::Vmm;

fn source(test: &str) -> (Arc<Vmm>, common::TempDir) {
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
    wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        t.lines().count() >= 3
    });
    wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        t.lines().count() >= 3
    });
    (Arc::new(vmm), dir)
}

/// A receiving VMM listening on a free loopback port.
fn destination(test: &str) -> (Arc<Vmm>, common::TempDir, String) {
    let (vmm, dir, addr, _) = destination_with_outcomes(test);
    (vmm, dir, addr)
}

/// Like `destination`, also handing back the outcome of every incoming
/// connection, in order: the line taken over, or the receiver's error.
fn destination_with_outcomes(
    test: &str,
) -> (
    Arc<Vmm>,
    common::TempDir,
    String,
    mpsc::Receiver<Result<String, String>>,
) {
    let dir = temp_dir(&format!("{test}-dst"));
    let vmm = Arc::new(vmm(&dir, VmmConfig::default()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let v = vmm.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let outcome =
                match vmbeam_vmm::migration::remote::receive(&v.shared, s, &|n| v.has_line(n)) {
                    Ok(vm) => {
                        let line = vm.spec.line.clone();
                        v.add_line(vm);
                        Ok(line)
                    }
                    Err(e) => Err(e.to_string()),
                };
            let _ = tx.send(outcome);
        }
    });
    (vmm, dir, addr, rx)
}

/// The receiver's outcome of the next connection (failing after 30 s).
fn next_outcome(rx: &mpsc::Receiver<Result<String, String>>) -> Result<String, String> {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the receiver did not finish with the connection in 30 s")
}

/// Waits until the destination runs the migrated host VM: its listener
/// thread takes it over right after COMMIT, so after `migrate` returns.
fn wait_taken_over(dst: &Vmm) {
    let t = std::time::Instant::now();
    while dst.status().host_vms.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the destination never started it"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn still_running(vmm: &Vmm, dir: &std::path::Path) {
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

#[test]
fn a_host_vm_moves_to_another_vmm_over_tcp() {
    if !kvm_or_skip("a_host_vm_moves_to_another_vmm_over_tcp") {
        return;
    }
    let (src, sdir) = source("tcp-ok");
    let (dst, ddir, addr) = destination("tcp-ok");
    let r = src
        .migrate(None, &format!("tcp://{addr}"), Duration::from_millis(300))
        .unwrap();
    assert_eq!(r.mode, "tcp");
    assert!(
        r.bytes_copied >= (16 << 20) - vmbeam_abi::l2::BULK_BASE,
        "{}",
        r.bytes_copied
    );
    assert_eq!(r.guests.len(), 2);
    assert!(r.precopy.as_ref().unwrap().rounds >= 2);
    // The source gave the VM away; the destination runs it and its guests
    // continue where they were (memtouch's rounds keep counting up).
    assert!(src.status().host_vms.is_empty());
    let last_round = memtouch_round(&console(&sdir, "l2-0")).unwrap();
    wait_console(&ddir, "l2-0", Duration::from_secs(60), |t| {
        memtouch_round(t).is_some_and(|n| n > last_round + 1)
    });
    assert!(
        !console(&ddir, "l2-0").contains("start mem"),
        "the guest was not restarted"
    );
    assert_memtouch_clean(&ddir, "l2-0", "on the destination");
    // Every word of memtouch's bulk arrived, read from outside L0.
    common::moves::check_bulk(&dst.current(None).unwrap(), "l2-0", 0x5eed_0000);
    wait_taken_over(&dst);
    let st = dst.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].name, "hv0");
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == 1));
    // And it can be rejuvenated there.
    let rj = dst
        .rejuvenate(
            None,
            &vmbeam_vmm::migration::rejuvenate::RejuvenateOptions::default(),
        )
        .unwrap();
    assert!(rj.guests.iter().all(|g| g.running_after), "{rj:?}");
}

/// The reason in the one REFUSE frame `out` must hold.
fn refusal(out: &[u8]) -> String {
    let mut r = out;
    let (k, p) = vmbeam_vmm::migration::wire::read_frame(&mut r).expect("a REFUSE frame");
    assert_eq!(k, vmbeam_vmm::migration::wire::Kind::Refuse);
    assert!(r.is_empty(), "more than one frame after the refusal");
    vmbeam_vmm::migration::wire::parse_reason(&p)
}

#[test]
fn a_corrupted_or_truncated_stream_is_rejected() {
    if !kvm_or_skip("a_corrupted_or_truncated_stream_is_rejected") {
        return;
    }
    let (dst, ddir, addr, outcomes) = destination_with_outcomes("tcp-bad");
    // Garbage: refused at the first frame header ("GET " is no magic);
    // the answer is one REFUSE frame that says so, then the connection closes.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not a migration stream")
        .unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the receiver closes the connection");
    let e = next_outcome(&outcomes).unwrap_err();
    assert_eq!(
        e,
        format!(
            "bad frame magic {:#x}: not a vmbeam migration stream",
            u32::from_le_bytes(*b"GET ")
        )
    );
    assert_eq!(refusal(&out), e);
    // A valid header announcing a huge frame: refused before anything of
    // that size is allocated or read, while the sender still holds the
    // connection open.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(&vmbeam_vmm::migration::wire::MAGIC.to_le_bytes());
    h.extend_from_slice(&vmbeam_vmm::migration::wire::VERSION.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&h).unwrap();
    let e = next_outcome(&outcomes).unwrap_err();
    assert_eq!(
        e,
        format!(
            "frame of {} bytes exceeds the {}-byte limit",
            u32::MAX,
            vmbeam_vmm::migration::wire::MAX_PAYLOAD
        )
    );
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the receiver closes the connection");
    assert_eq!(refusal(&out), e);
    drop(s);
    // A HELLO asking for absurd memory.
    let mut s = TcpStream::connect(&addr).unwrap();
    let hello = br#"{"line":"evil","generation":1,"ram":1,"pool":99999999999999,"vcpus":1,"slice_us":1,"regions":[]}"#;
    vmbeam_vmm::migration::wire::write_frame(
        &mut s,
        vmbeam_vmm::migration::wire::Kind::Hello,
        hello,
    )
    .unwrap();
    let (k, p) = vmbeam_vmm::migration::wire::read_frame(&mut s).unwrap();
    assert_eq!(k, vmbeam_vmm::migration::wire::Kind::Refuse);
    let refusal = vmbeam_vmm::migration::wire::parse_reason(&p);
    assert!(
        refusal.starts_with("incoming migration rejected: "),
        "{refusal}"
    );
    assert_eq!(next_outcome(&outcomes).unwrap_err(), refusal);
    assert!(dst.status().host_vms.is_empty(), "nothing was accepted");
    assert!(!dst.has_line("evil"));

    // The receiver still works: a real host VM moves to it afterwards.
    let (src, _sdir) = source("tcp-bad");
    src.migrate(None, &format!("tcp://{addr}"), Duration::from_millis(300))
        .unwrap();
    assert_eq!(next_outcome(&outcomes), Ok("hv0".to_string()));
    assert_eq!(dst.status().host_vms.len(), 1);
    let round = memtouch_round(&console(&ddir, "l2-0")).unwrap_or(0);
    wait_console(&ddir, "l2-0", Duration::from_secs(60), |t| {
        memtouch_round(t).is_some_and(|n| n > round)
    });
    assert!(dst.failure().is_none());
}

/// Forwards a connection to `to`, flipping one byte after `after` bytes
/// (or cutting the stream there if `cut`).
fn damaging_proxy(to: String, after: usize, cut: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(&to).unwrap();
        let mut back_a = a.try_clone().unwrap();
        let mut back_b = b.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_b, &mut back_a);
        });
        let mut seen = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= after && after < seen + n {
                if cut {
                    let _ = b.write_all(&buf[..after - seen]);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    return;
                }
                buf[after - seen] ^= 0x40;
            }
            seen += n;
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

#[test]
fn the_source_keeps_running_when_the_stream_is_damaged() {
    if !kvm_or_skip("the_source_keeps_running_when_the_stream_is_damaged") {
        return;
    }
    let (src, sdir) = source("tcp-damage");
    let (dst, _ddir, addr, outcomes) = destination_with_outcomes("tcp-damage");
    for (after, cut) in [(3_000_000, false), (5_000_000, true), (100, false)] {
        let proxy = damaging_proxy(addr.clone(), after, cut);
        let e = src
            .migrate(None, &format!("tcp://{proxy}"), Duration::from_millis(300))
            .unwrap_err();
        let msg = e.to_string();
        assert!(!msg.is_empty());
        // The receiver refused the damaged stream too, and is done with it.
        let theirs = next_outcome(&outcomes).unwrap_err();
        println!("damaged at {after} (cut {cut}): sender: {msg}; receiver: {theirs}");
        still_running(&src, &sdir);
        assert!(
            dst.status().host_vms.is_empty(),
            "a damaged stream was accepted ({msg})"
        );
    }
    // Unreachable and malformed destinations give clear errors.
    let e = src
        .migrate(None, "tcp://127.0.0.1:1", Duration::from_millis(300))
        .unwrap_err();
    assert!(
        e.to_string().contains("cannot connect to 127.0.0.1:1"),
        "{e}"
    );
    let e = src
        .migrate(None, "nowhere", Duration::from_millis(300))
        .unwrap_err();
    assert!(e.to_string().contains("bad destination"), "{e}");
    still_running(&src, &sdir);
    // After all that, a clean migration still works.
    if let Err(e) = src.migrate(None, &format!("tcp://{addr}"), Duration::from_millis(300)) {
        panic!(
            "the clean migration failed: {e}; receiver: {:?}",
            outcomes.recv_timeout(Duration::from_secs(30))
        );
    }
    assert_eq!(next_outcome(&outcomes), Ok("hv0".to_string()));
    wait_taken_over(&dst);
    assert_eq!(dst.status().host_vms.len(), 1);
    assert!(src.status().host_vms.is_empty());
}
