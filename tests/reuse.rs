//! Memory reuse on a return trip (A → B → A): A keeps the image of the host
//! VM that left it; when the VM comes back, only pages whose hash differs
//! from A's kept page cross the wire. An idle guest's return sends less than
//! a tenth of its first trip; a guest whose memory was rewritten on B sends
//! all of it; an expired or foreign image is never used.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::rejuvenate::Report;
use vmbeam_vmm::migration::remote::{self, ReceiveOptions};
use vmbeam_vmm::migration::reuse::ReuseCache;
use vmbeam_vmm::vmm::Vmm;

const GUEST_MEM: u64 = 64 << 20;

/// A VMM that keeps departed VMs' images for `ttl`, listening on loopback.
fn host(test: &str, side: &str, ttl: Duration, boot: bool) -> (Arc<Vmm>, common::TempDir, String) {
    let dir = temp_dir(&format!("{test}-{side}"));
    let v = Arc::new(vmm(
        &dir,
        VmmConfig {
            nested: 1,
            nested_mem: GUEST_MEM,
            workloads: vec![Workload::Memtouch],
            // memtouch halts after its first round: an idle guest.
            workload_param: 1,
            ..Default::default()
        },
    ));
    v.set_reuse(ReuseCache::new(ttl, 8 << 30));
    if boot {
        v.start("hv0").unwrap();
        wait_console(&dir, "l2-0", Duration::from_secs(120), |t| {
            t.lines().count() >= 2
        });
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", l.local_addr().unwrap());
    let r = v.clone();
    std::thread::spawn(move || {
        let opts = ReceiveOptions {
            reuse: r.reuse(),
            ..Default::default()
        };
        for s in l.incoming().flatten() {
            if let Ok(vm) = remote::receive_with(&r.shared, s, &|n| r.has_line(n), &opts) {
                r.add_line(vm);
            }
        }
    });
    (v, dir, addr)
}

fn go(from: &Vmm, to: &str, dest: &Vmm) -> Report {
    let r = from.migrate(None, to, Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    while !dest.has_line("hv0") {
        assert!(t.elapsed() < Duration::from_secs(30), "never taken over");
        std::thread::sleep(Duration::from_millis(5));
    }
    for g in &r.guests {
        assert_eq!(g.checksum_before, g.checksum_after, "{g:?}");
        assert!(g.running_after, "{g:?}");
    }
    r
}

#[test]
fn an_idle_guest_comes_back_for_a_fraction_of_its_first_trip() {
    if !kvm_or_skip("an_idle_guest_comes_back_for_a_fraction_of_its_first_trip") {
        return;
    }
    let ttl = Duration::from_secs(600);
    let (a, _adir, to_a) = host("reuse-idle", "a", ttl, true);
    let (b, _bdir, to_b) = host("reuse-idle", "b", ttl, false);
    let there = go(&a, &to_b, &b);
    let t1 = there.transfer.clone().unwrap();
    assert!(!t1.reuse && t1.reused_bytes == 0);
    assert!(t1.kept_bytes > 0, "A keeps the image: {t1:?}");
    assert_eq!(a.reuse().unwrap().held_bytes(), t1.kept_bytes);
    let back = go(&b, &to_a, &a);
    let t2 = back.transfer.clone().unwrap();
    assert!(t2.reuse, "A's image was used: {t2:?}");
    assert!(
        t2.page_bytes * 10 < t1.page_bytes,
        "return trip sent {} bytes, first trip {}",
        t2.page_bytes,
        t1.page_bytes
    );
    eprintln!(
        "reuse: first trip {} bytes, return trip {} bytes ({} not sent)",
        t1.page_bytes, t2.page_bytes, t2.reused_bytes
    );
    assert!(t2.reused_bytes >= GUEST_MEM / 2, "{t2:?}");
    // The image served once and is gone.
    assert_eq!(a.reuse().unwrap().held_bytes(), 0);
    // B kept its own copy when the VM left it: going there again reuses it.
    let again = go(&a, &to_b, &b);
    assert!(again.transfer.unwrap().reuse);
}

#[test]
fn a_rewritten_guest_sends_everything_and_stale_images_are_not_used() {
    if !kvm_or_skip("a_rewritten_guest_sends_everything_and_stale_images_are_not_used") {
        return;
    }
    let ttl = Duration::from_secs(600);
    let (a, _adir, to_a) = host("reuse-dirty", "a", ttl, true);
    let (b, _bdir, to_b) = host("reuse-dirty", "b", ttl, false);
    let there = go(&a, &to_b, &b);
    // On B, all of the guest's bulk memory gets new contents (L0 fills it
    // with another seed's pattern, at host speed).
    let vm = b.current(None).unwrap();
    for n in vm.nested.lock().unwrap().vms.values() {
        let n = n.lock().unwrap();
        let bulk = vmbeam_abi::l2::BULK_BASE;
        n.fill_pattern(bulk, GUEST_MEM - bulk, 0xdead_beef).unwrap();
    }
    let back = go(&b, &to_a, &a);
    let t = back.transfer.clone().unwrap();
    assert!(t.reuse, "{t:?}");
    assert!(
        t.page_bytes >= GUEST_MEM - vmbeam_abi::l2::BULK_BASE,
        "only {} bytes sent for {} rewritten",
        t.page_bytes,
        GUEST_MEM - vmbeam_abi::l2::BULK_BASE
    );
    assert!(there.transfer.unwrap().page_bytes >= t.page_bytes / 2);

    // A foreign epoch: B claims an image A never kept under that epoch.
    let (c, _cdir, to_c) = host("reuse-dirty", "c", ttl, false);
    go(&a, &to_c, &c);
    c.reuse()
        .unwrap()
        .note_origin("hv0", vmbeam_vmm::migration::reuse::random_u128());
    let t = go(&c, &to_a, &a).transfer.unwrap();
    assert!(!t.reuse && t.reused_bytes == 0, "{t:?}");

    // An expired image: kept for no time at all, so never offered.
    let (d, _ddir, to_d) = host("reuse-dirty", "d", Duration::ZERO, false);
    let (e, _edir, to_e) = host("reuse-dirty", "e", ttl, false);
    go(&a, &to_d, &d);
    let out = go(&d, &to_e, &e).transfer.unwrap();
    assert_eq!(out.kept_bytes, 0, "a zero ttl keeps nothing");
    let t = go(&e, &to_d, &d).transfer.unwrap();
    assert!(!t.reuse && t.reused_bytes == 0, "{t:?}");
    let _ = (to_b, to_e);
}
