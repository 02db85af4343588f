//! virtio-net for nested guests: netecho (virtio-drivers and smoltcp) on a
//! TAP in a network namespace made by the test answers 300 pings sent
//! every 10 ms across a zero-copy rejuvenation with none lost, and a TCP
//! connection to its echo service opened before the rejuvenation echoes
//! correctly after it. Also: bad net bindings are refused before boot.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::netns::{self, TapNs};
use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::devices::binding::parse_net;
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;

fn netecho_vmm(dir: &std::path::Path, tap: &str) -> Vmm {
    vmm(
        dir,
        VmmConfig {
            nested: 1,
            workloads: vec![Workload::Netecho],
            workload_param: netns::netecho_param(),
            devices: vec![parse_net(&format!("l2-0=tap:{tap}")).unwrap()],
            ..Default::default()
        },
    )
}

/// Sends `msg` and reads back as many bytes.
fn echo(s: &mut std::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn netecho_answers_every_ping_and_keeps_its_tcp_connection_across_a_rejuvenation() {
    let what = "netecho_answers_every_ping_and_keeps_its_tcp_connection_across_a_rejuvenation";
    if !netns::net_or_skip(what) {
        return;
    }
    let dir = temp_dir("net1");
    let net = TapNs::create("p").unwrap();
    let vmm = netecho_vmm(&dir, &net.tap);
    net.move_in().unwrap();
    vmm.start("hv0").unwrap();
    let up = wait_console(&dir, "l2-0", Duration::from_secs(120), |t| {
        t.contains("netecho l2-0 up")
    });
    let ip = netns::guest_ip();
    assert!(up.contains(&format!("ip={ip}/24")), "{up}");
    // First contact (ARP, then one echo), with a generous deadline: guest
    // code is slow here.
    let first = net
        .exec("ping")
        .args(["-c", "1", "-w", "60", &ip])
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "no answer to a first ping: {}\n{}",
        String::from_utf8_lossy(&first.stdout),
        console(&dir, "l2-0")
    );
    let addr: SocketAddr = format!("{ip}:7").parse().unwrap();
    let mut tcp = net.connect(addr, Duration::from_secs(60)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let before = b"opened before the rejuvenation\n";
    assert_eq!(echo(&mut tcp, before), before);

    // 300 pings every 10 ms; `-w` only bounds the wait for late answers.
    let mut ping = net
        .exec("ping")
        .args(["-c", "300", "-i", "0.01", "-w", "120", &ip])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = ping.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            if line.contains("bytes from") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // A few answers first, so the rejuvenation falls inside the run.
    for _ in 0..20 {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("ping got no answers before the rejuvenation");
    }
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    let still_pinging = ping.try_wait().unwrap().is_none();
    assert_eq!(r.to_generation, 2);
    assert!(r.guests.iter().all(|g| g.running_after), "{r:?}");
    assert_eq!(r.guests[0].devices, 1, "{r:?}");
    assert!(
        still_pinging,
        "ping finished before the rejuvenation was over; the test proves nothing"
    );
    let status = ping.wait().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    let _ = ping.stderr.take().unwrap().read_to_string(&mut err);
    let (sent, received, dups) =
        netns::ping_summary(&out).unwrap_or_else(|| panic!("no ping summary:\n{out}\n{err}"));
    // With `-w`, ping keeps sending until it has `-c` answers, so a late
    // answer can leave one or two extra requests unanswered at its exit:
    // the judge is that each of the 300 requests was answered, once.
    let mut answered = vec![0u32; 301];
    for seq in netns::answered_seqs(&out) {
        if let Some(n) = answered.get_mut(seq as usize) {
            *n += 1;
        }
    }
    let missing: Vec<usize> = (1..=300).filter(|&s| answered[s] == 0).collect();
    let repeated: Vec<usize> = (1..=300).filter(|&s| answered[s] > 1).collect();
    assert!(
        missing.is_empty() && repeated.is_empty() && received == 300 && dups == 0 && sent >= 300,
        "pings lost {missing:?} or repeated {repeated:?} across the rejuvenation \
         ({sent} sent, {received} received, {dups} duplicates; downtime {} µs):\n{out}{err}",
        r.guests[0].downtime_us
    );
    assert!(status.success(), "{out}{err}");
    println!(
        "ping across the rejuvenation: {sent} sent, {received} received; guest downtime {} µs, \
         device requests in flight at the pause {}",
        r.guests[0].downtime_us, r.guests[0].device_in_flight
    );

    // The connection opened before the rejuvenation still echoes.
    let after = b"echoed after the rejuvenation, on the same connection\n";
    assert_eq!(echo(&mut tcp, after), after);
    let st = vmm.status();
    let n = &st.host_vms[0].nested[0];
    assert_eq!(n.generation, 2);
    assert_eq!(n.devices.len(), 1, "the card moved with the guest");
    let d = &n.devices[0];
    assert_eq!(d.kind, "virtio-net");
    assert!(d.backend.contains(&net.tap), "{d:?}");
    let c = d.counters;
    assert!(c.rx_frames >= 301 && c.tx_frames >= 301, "{c:?}");
    assert!(c.bytes_in > 0 && c.bytes_out > 0, "{c:?}");
    assert_eq!((c.errors, c.resets_needed), (0, 0), "{c:?}");
    // Every frame delivered raised the card's irqfd (netecho polls, so the
    // delivery itself is shown by blkcheck's interrupt mode).
    assert!(c.interrupts >= 300, "{c:?}");
    drop(tcp);
    vmm.shutdown();
}

#[test]
fn bad_net_bindings_are_refused_before_boot() {
    let dir = temp_dir("netbad");
    for (spec, why) in [
        ("l2-0=tap:vt0,mac=01:00:00:00:00:01", "bad MAC"),
        ("l2-0=tap:vt0,mac=52:54:00:00:00", "bad MAC"),
        ("l2-0=tap:vt0,mac=52:54:zz:00:00:01", "bad MAC"),
        ("l2-0=vt0", "expected tap:NAME"),
        ("l2-0=tap:", "a TAP name must be"),
        ("l2-0=tap:waytoolongname0123", "a TAP name must be"),
        ("l2-0=tap:vt0,speed=10", "unknown option"),
    ] {
        let e = parse_net(spec).unwrap_err().to_string();
        assert!(e.contains(why), "{spec}: {e}");
    }
    if !kvm_or_skip("bad_net_bindings_are_refused_before_boot") {
        return;
    }
    let err = |spec: &str| {
        let cfg = VmmConfig {
            nested: 1,
            workloads: vec![Workload::Netecho],
            console_dir: Some(dir.to_path_buf()),
            devices: vec![parse_net(spec).unwrap()],
            ..Default::default()
        };
        match Vmm::new(cfg, vmbeam::images(None).unwrap()) {
            Ok(_) => panic!("{spec} accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err("l2-0=tap:vbnosuchtap0");
    assert!(
        e.contains("vbnosuchtap0") && e.contains("does not exist"),
        "{e}"
    );
    let e = err("l2-5=tap:vbnosuchtap0");
    assert!(e.contains("'l2-5'") && e.contains("does not create"), "{e}");
}
