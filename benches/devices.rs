//! Devices of nested guests, side by side in one run:
//! - block throughput and IOPS of `blkcheck` (virtio-drivers in the nested
//!   guest, polling and interrupt mode) against L0 doing the same sequence
//!   of 4 KiB reads, writes and flushes on the same file directly;
//! - the pause a rejuvenation costs a guest (per-guest downtime and total
//!   time) with and without a virtio disk or network card, same workload
//!   (memtouch with an idle device placed, or none), plus blkcheck with its
//!   disk busy;
//! - ping round trip and UDP echo rate of `netecho` (virtio-drivers and
//!   smoltcp) on its virtio-net card and TAP, against the host talking to
//!   itself over a veth pair (needs root and /dev/net/tun; skipped
//!   otherwise).
//!
//! Written to `docs/benchmarks.md` between markers. Run:
//! `cargo bench --bench devices` (`VMBEAM_BENCH_REPS`, default 5).

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::devices::binding::{parse_disk, parse_net, Binding};
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;

#[path = "common.rs"]
mod common;
use common::*;

/// Sectors of the benchmark disk.
const SECTORS: u64 = 256;
/// blkcheck rounds per throughput run.
const ROUNDS: u64 = 4;

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("l2-0.log")).unwrap_or_default()
}

fn wait_for(dir: &Path, what: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if console(dir).contains(what) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no '{what}' on l2-0:\n{}",
            console(dir)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn vmm(dir: &Path, workload: Workload, disk: Option<&Path>, param0: u64, param1: u64) -> Vmm {
    let devices = disk
        .map(|p| vec![parse_disk(&format!("l2-0={}", p.display())).unwrap()])
        .unwrap_or_default();
    vmm_with(dir, workload, devices, param0, param1)
}

fn vmm_with(
    dir: &Path,
    workload: Workload,
    devices: Vec<Binding>,
    param0: u64,
    param1: u64,
) -> Vmm {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    Vmm::new(
        VmmConfig {
            nested: 1,
            workloads: vec![workload],
            workload_param: param0,
            workload_param1: param1,
            console_dir: Some(dir.to_path_buf()),
            devices,
            ..Default::default()
        },
        vmbeam::images(None).unwrap(),
    )
    .unwrap()
}

struct Io {
    secs: f64,
    bytes: u64,
    requests: u64,
}

/// blkcheck's ROUNDS rounds, from its start line to its done line.
fn guest_io(base: &Path, img: &Path, irq: bool) -> Io {
    std::fs::write(img, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    let dir = base.join(if irq { "irq" } else { "poll" });
    let vmm = vmm(&dir, Workload::Blkcheck, Some(img), ROUNDS, irq as u64);
    vmm.start("hv0").unwrap();
    let t0 = wait_for(&dir, "start sectors=", Duration::from_secs(120));
    let c0 = vmm.status().host_vms[0].nested[0].devices[0].counters;
    let t1 = wait_for(&dir, " done ", Duration::from_secs(600));
    let c1 = vmm.status().host_vms[0].nested[0].devices[0].counters;
    vmm.shutdown();
    assert!(
        console(&dir).contains("bad=0 errors=0"),
        "{}",
        console(&dir)
    );
    Io {
        secs: (t1 - t0).as_secs_f64(),
        bytes: (c1.bytes_in + c1.bytes_out) - (c0.bytes_in + c0.bytes_out),
        requests: c1.requests - c0.requests,
    }
}

/// The same request sequence as blkcheck's rounds, by L0 on the file.
fn direct_io(img: &Path) -> Io {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let chunks = SECTORS / 8;
    let (mut bytes, mut requests) = (0, 0);
    let t0 = Instant::now();
    for r in 1..=ROUNDS {
        let passes: &[bool] = if r == 1 {
            &[true, false]
        } else {
            &[false, true, false]
        };
        for (i, &write) in passes.iter().enumerate() {
            for c in 0..chunks {
                let off = c * 4096;
                if write {
                    buf[0] = r as u8;
                    f.write_all_at(&buf, off).unwrap();
                } else {
                    f.read_exact_at(&mut buf, off).unwrap();
                }
                bytes += 4096;
                requests += 1;
            }
            if write && i + 1 < passes.len() {
                f.sync_data().unwrap();
                requests += 1;
            }
        }
    }
    Io {
        secs: t0.elapsed().as_secs_f64(),
        bytes,
        requests,
    }
}

/// Medians of the per-guest downtime (ms) and total (ms) of `reps`
/// zero-copy rejuvenations of a guest.
fn pauses(
    base: &Path,
    name: &str,
    workload: Workload,
    disk: Option<&Path>,
    reps: usize,
) -> (f64, f64) {
    if let Some(d) = disk {
        std::fs::write(d, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    }
    let devices = disk
        .map(|p| vec![parse_disk(&format!("l2-0={}", p.display())).unwrap()])
        .unwrap_or_default();
    pauses_with(base, name, workload, devices, reps)
}

/// As [`pauses`], with any device bindings.
fn pauses_with(
    base: &Path,
    name: &str,
    workload: Workload,
    devices: Vec<Binding>,
    reps: usize,
) -> (f64, f64) {
    let count = devices.len();
    let dir = base.join(name);
    let vmm = vmm_with(&dir, workload, devices, 0, 0);
    vmm.start("hv0").unwrap();
    wait_for(&dir, "round=1 ", Duration::from_secs(120));
    let (mut down, mut total) = (Vec::new(), Vec::new());
    let opts = RejuvenateOptions {
        verify: false,
        ..Default::default()
    };
    for _ in 0..reps {
        let r = vmm.rejuvenate(None, &opts).unwrap();
        down.push(r.guests[0].downtime_us as f64 / 1000.0);
        total.push(r.total_ms);
        std::thread::sleep(Duration::from_millis(300));
    }
    let n = &vmm.status().host_vms[0].nested[0];
    assert_eq!(n.devices.len(), count);
    vmm.shutdown();
    (median(down), median(total))
}

/// Round trips of one `size`-byte datagram at a time from a socket made
/// in namespace `ns` to `to`, for `n` answers (a lost one is sent again
/// after 1 s): answers per second.
fn udp_rate(ns: &str, to: SocketAddr, n: usize, size: usize) -> f64 {
    let sock = netns::in_ns(ns, || UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let msg = vec![0x5a; size];
    let mut buf = vec![0u8; 2048];
    let mut one = || loop {
        sock.send_to(&msg, to).unwrap();
        if let Ok((k, _)) = sock.recv_from(&mut buf) {
            assert_eq!(&buf[..k], &msg[..]);
            return;
        }
    };
    for _ in 0..5 {
        one();
    }
    let t0 = Instant::now();
    for _ in 0..n {
        one();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// `ping -c COUNT -i 0.01 -q` run by `cmd`: (min, avg) round trip in ms.
fn ping_rtt(mut cmd: std::process::Command, ip: &str, count: u32) -> (f64, f64) {
    let out = cmd
        .args([
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-q",
            "-w",
            "120",
            ip,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (min, avg, _) = netns::ping_rtt(&text).unwrap_or_else(|| panic!("ping: {text}"));
    (min, avg)
}

/// Round trip and UDP echo rate of netecho (over its TAP) and of the host
/// talking to itself over a veth pair (a UDP echo thread on the far end),
/// side by side. `None` (with the reason printed) when namespaces, TAPs or
/// ping are not available.
fn net_figures(base: &Path) -> Option<String> {
    if let Some(why) = netns::unusable() {
        println!("SKIP devices bench, network part: {why}");
        return None;
    }
    const PINGS: u32 = 200;
    const GUEST_UDP: usize = 300;
    const HOST_UDP: usize = 5000;
    let tap = netns::TapNs::create("b").unwrap();
    let dir = base.join("net");
    let vmm = vmm_with(
        &dir,
        Workload::Netecho,
        vec![parse_net(&format!("l2-0=tap:{}", tap.tap)).unwrap()],
        netns::netecho_param(),
        0,
    );
    tap.move_in().unwrap();
    vmm.start("hv0").unwrap();
    wait_for(&dir, "netecho l2-0 up", Duration::from_secs(120));
    let ip = netns::guest_ip();
    let _ = ping_rtt(tap.exec("ping"), &ip, 3);
    let guest_ping = ping_rtt(tap.exec("ping"), &ip, PINGS);
    let to: SocketAddr = format!("{ip}:7").parse().unwrap();
    let guest_udp = udp_rate(&tap.ns, to, GUEST_UDP, 64);
    vmm.shutdown();
    drop(vmm);
    drop(tap);

    let veth = netns::VethPair::create("b").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = netns::in_ns(&veth.b, || {
        let s = UdpSocket::bind(format!("{}:7", netns::VethPair::B_IP))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    })
    .unwrap();
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        })
    };
    let host_ping = ping_rtt(veth.exec_a("ping"), netns::VethPair::B_IP, PINGS);
    let to: SocketAddr = format!("{}:7", netns::VethPair::B_IP).parse().unwrap();
    let host_udp = udp_rate(&veth.a, to, HOST_UDP, 64);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().unwrap();
    drop(veth);

    Some(format!(
        "\nNetwork: netecho (virtio-drivers and smoltcp in emulated guest code, polling) on \
         its virtio-net card and TAP, against the host talking to itself over a veth pair \
         between two namespaces (the kernel answers the pings; a host thread echoes the \
         datagrams). Ping: `ping -c {PINGS} -i 0.01`; UDP: one 64-byte datagram at a time \
         to the echo port, {GUEST_UDP} round trips for netecho and {HOST_UDP} for the host.\n\n\
         | path | ping min (ms) | ping avg (ms) | UDP echoes/s | ping avg vs host | UDP rate vs host |\n\
         |---|---|---|---|---|---|\n\
         | netecho, virtio-net over a TAP | {:.3} | {:.3} | {:.0} | {:.1}x | {:.4}x |\n\
         | host over a veth pair | {:.3} | {:.3} | {:.0} | 1.0x | 1.0000x |\n",
        guest_ping.0,
        guest_ping.1,
        guest_udp,
        guest_ping.1 / host_ping.1,
        guest_udp / host_udp,
        host_ping.0,
        host_ping.1,
        host_udp,
    ))
}

fn main() {
    if !kvm_or_skip("devices bench") {
        return;
    }
    let (_, reps) = sizes_and_reps("16M", 5);
    let base = std::env::temp_dir().join(format!("vmbeam-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let img = base.join("disk.img");
    let poll = guest_io(&base, &img, false);
    let irq = guest_io(&base, &img, true);
    let direct = direct_io(&img);
    let rate = |io: &Io| {
        (
            io.bytes as f64 / io.secs / (1 << 20) as f64,
            io.requests as f64 / io.secs,
        )
    };
    let (dp_mb, dp_iops) = rate(&direct);
    let mut t = format!(
        "Machine: {}. One run of `cargo bench --bench devices`.\n\n\
         Block I/O: blkcheck's {ROUNDS} rounds on a {SECTORS}-sector image (4 KiB requests: \
         write and read back every block, and from round 2 first read the previous round's \
         data; a flush per round), timed from its start line to its done line; L0 runs the \
         same request sequence on the same file with pread/pwrite/fdatasync. The guest \
         time includes generating and checking every word in emulated guest code.\n\n\
         | who | requests | MiB | time (s) | MiB/s | IOPS | vs L0 direct |\n|---|---|---|---|---|---|---|\n",
        machine()
    );
    for (who, io) in [
        ("blkcheck, polling the used ring", &poll),
        ("blkcheck, sleeping on interrupts", &irq),
        ("L0 direct file I/O", &direct),
    ] {
        let (mb, iops) = rate(io);
        t += &format!(
            "| {who} | {} | {:.2} | {:.3} | {:.2} | {:.0} | {:.4}x |\n",
            io.requests,
            io.bytes as f64 / (1 << 20) as f64,
            io.secs,
            mb,
            iops,
            iops / dp_iops
        );
    }
    let _ = dp_mb;
    let without = pauses(&base, "without", Workload::Memtouch, None, reps);
    let with = pauses(&base, "with", Workload::Memtouch, Some(&img), reps);
    let busy = pauses(&base, "busy", Workload::Blkcheck, Some(&img), reps);
    // A TAP for an idle card on memtouch (the guest hypervisor places every
    // bound device, whatever the workload).
    let card = if netns::unusable().is_none() {
        let tap = netns::TapNs::create("r").unwrap();
        let b = vec![parse_net(&format!("l2-0=tap:{}", tap.tap)).unwrap()];
        Some(pauses_with(&base, "withnet", Workload::Memtouch, b, reps))
    } else {
        None
    };
    t += &format!(
        "\nRejuvenation pause ({reps} zero-copy rejuvenations each, medians; `downtime` is the \
         guest's, from its pause to its first run under the successor):\n\n\
         | guest | downtime (ms) | total (ms) | downtime vs no device |\n|---|---|---|---|\n\
         | memtouch, no device | {:.2} | {:.1} | 1.00x |\n\
         | memtouch, idle virtio disk placed | {:.2} | {:.1} | {:.2}x |\n\
         | blkcheck, disk busy | {:.2} | {:.1} | {:.2}x |\n{}",
        without.0,
        without.1,
        with.0,
        with.1,
        with.0 / without.0,
        busy.0,
        busy.1,
        busy.0 / without.0,
        card.map(|c| format!(
            "| memtouch, idle virtio-net card placed | {:.2} | {:.1} | {:.2}x |\n",
            c.0,
            c.1,
            c.0 / without.0
        ))
        .unwrap_or_default()
    );
    if let Some(net) = net_figures(&base) {
        t += &net;
    }
    println!("{t}");
    write_section("devices-bench", "Devices of nested guests", &t);
    let _ = std::fs::remove_dir_all(&base);
}
