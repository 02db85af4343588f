//! Host-to-host migration over loopback TCP against QEMU's own migration,
//! side by side in one run.
//!
//! For each size (default 1 GiB and 4 GiB; override with
//! `VMBEAM_BENCH_SIZES`) one host VM with one idle nested guest (memtouch
//! that halts after its first round, so its whole memory holds data) moves
//! A → B in plain TCP, B → A with mutual TLS (A kept the image, so only
//! changed pages go back), then by post-copy (the VM runs on the
//! destination at once, its pages follow), and then QEMU migrates a
//! paused VM of the same size whose RAM holds the same pattern, normally
//! (every page sent before the switch) and with `postcopy-ram`. Every
//! pre-copy move compares the guests' checksums on both sides, every
//! post-copy move the image digests each side computed. The table goes to
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench --bench remote` (QEMU rows need `qemu-system-x86_64`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::{VmmConfig, Workload};

#[path = "common.rs"]
mod common;
#[path = "qemu.rs"]
mod qemu;
use common::*;
use vmbeam_vmm::migration::remote::{MigrateOptions, ReceiveOptions};
use vmbeam_vmm::migration::reuse::ReuseCache;
use vmbeam_vmm::migration::tls::TlsDir;
use vmbeam_vmm::vmm::Vmm;

struct Row {
    size: u64,
    what: String,
    total_ms: f64,
    resume_ms: f64,
    downtime_ms: f64,
    sent: u64,
    reused: u64,
    wire: u64,
    gbps: f64,
    ok: bool,
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn vmm() -> Arc<Vmm> {
    Arc::new(
        Vmm::new(
            VmmConfig {
                quiet: true,
                ..Default::default()
            },
            vmbeam::images(None).unwrap(),
        )
        .unwrap(),
    )
}

fn listener(vmm: Arc<Vmm>, tls: Option<TlsDir>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", l.local_addr().unwrap());
    let opts = ReceiveOptions {
        tls,
        reuse: vmm.reuse(),
        ..Default::default()
    };
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            match vmbeam_vmm::migration::remote::receive_with(
                &vmm.shared,
                s,
                &|n| vmm.has_line(n),
                &opts,
            ) {
                Ok(vm) => vmm.add_line(vm),
                Err(e) => eprintln!("bench: receive failed: {e}"),
            }
        }
    });
    addr
}

fn wait_line(v: &Vmm, name: &str) {
    let t = Instant::now();
    while !v.has_line(name) {
        assert!(t.elapsed() < Duration::from_secs(120), "never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A CA and one host certificate for 127.0.0.1, made with openssl.
fn certs(dir: &std::path::Path) -> Option<TlsDir> {
    std::fs::create_dir_all(dir).ok()?;
    let sh = format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem \
         -out host.csr -subj /CN=bench-host 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in host.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
         -out cert.pem -days 2 -extfile ext 2>/dev/null",
        d = dir.display()
    );
    let ok = std::process::Command::new("sh")
        .args(["-c", &sh])
        .status()
        .ok()?
        .success();
    if !ok {
        eprintln!("bench: openssl not usable; TLS rows skipped");
        return None;
    }
    TlsDir::load(dir).ok()
}

fn run_size(size: u64, tls: Option<&TlsDir>) -> Vec<Row> {
    let a = Arc::new(
        Vmm::new(
            VmmConfig {
                nested: 1,
                nested_mem: size,
                workloads: vec![Workload::Memtouch],
                workload_param: 1,
                quiet: true,
                ..Default::default()
            },
            vmbeam::images(None).unwrap(),
        )
        .unwrap(),
    );
    a.set_reuse(ReuseCache::new(Duration::from_secs(600), 16 << 30));
    a.start("bench").unwrap();
    // memtouch's first round has filled its memory once it printed twice.
    let deadline = Instant::now() + Duration::from_secs(600);
    while a
        .status()
        .host_vms
        .iter()
        .flat_map(|v| &v.nested)
        .all(|n| n.console_lines < 2)
    {
        assert!(Instant::now() < deadline, "guest made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = vmm();
    b.set_reuse(ReuseCache::new(Duration::from_secs(600), 16 << 30));
    let to_b = listener(b.clone(), None);
    let to_a = listener(a.clone(), tls.cloned());
    let mut rows = Vec::new();
    let mut row = |what: &str, r: &vmbeam_vmm::migration::rejuvenate::Report| {
        let t = r.transfer.as_ref().unwrap();
        rows.push(Row {
            size,
            what: what.into(),
            total_ms: r.total_ms,
            resume_ms: t.time_to_resume_ms,
            downtime_ms: r.handover_ms,
            sent: t.page_bytes,
            reused: t.reused_bytes,
            wire: t.wire_bytes_sent,
            gbps: t.memory_gbps,
            ok: r.guests.iter().all(|g| g.running_after)
                && match &t.postcopy {
                    Some(p) => p.source_digest == p.destination.digest,
                    None => r
                        .guests
                        .iter()
                        .all(|g| g.checksum_before == g.checksum_after),
                },
        });
    };
    let budget = Duration::from_millis(300);
    let r = a.migrate(None, &to_b, budget).unwrap();
    wait_line(&b, "bench");
    row("vmbeam pre-copy, TCP", &r);
    if let Some(t) = tls {
        let r = b
            .migrate_with(
                None,
                &to_a,
                &MigrateOptions {
                    downtime: budget,
                    tls: Some(t.clone()),
                    ..Default::default()
                },
            )
            .unwrap();
        wait_line(&a, "bench");
        row("vmbeam pre-copy back, mutual TLS, reuse", &r);
    }
    // Post-copy from wherever the VM is now to the other side.
    // (The listener of A wants TLS when the bench has certificates.)
    let (from, to, there, with) = if a.has_line("bench") {
        (&a, &to_b, &b, None)
    } else {
        (&b, &to_a, &a, tls.cloned())
    };
    let what = if with.is_some() {
        "vmbeam post-copy, mutual TLS"
    } else {
        "vmbeam post-copy, TCP"
    };
    let r = from
        .migrate_with(
            None,
            to,
            &MigrateOptions {
                postcopy: true,
                tls: with,
                ..Default::default()
            },
        )
        .unwrap();
    wait_line(there, "bench");
    row(what, &r);
    a.shutdown();
    b.shutdown();
    rows
}

fn main() {
    if !kvm_or_skip("bench remote") {
        return;
    }
    let (sizes, _) = sizes_and_reps("1G,4G", 1);
    let tls = certs(&std::env::temp_dir().join(format!("vmbeam-bench-tls-{}", std::process::id())));
    let mut rows = Vec::new();
    for &size in &sizes {
        eprintln!("bench: remote {} ...", human(size));
        rows.extend(run_size(size, tls.as_ref()));
        let fill = |path: &std::path::Path, len: u64| {
            use std::io::Write as _;
            let mut f =
                std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
            let seed = 0x5eed_0000;
            for a in (0..len).step_by(8) {
                f.write_all(&vmbeam_abi::checksum::pattern_word(seed, a).to_le_bytes())
                    .unwrap();
            }
        };
        for q in qemu::measure_variants(size, &fill, &["normal", "postcopy-ram"]) {
            rows.push(Row {
                size,
                what: if q.variant == "normal" {
                    "QEMU, paused VM (unix socket)".into()
                } else if q.switched {
                    "QEMU postcopy-ram, paused VM (unix socket)".into()
                } else {
                    "QEMU postcopy-ram, paused VM (finished before the switch)".into()
                },
                total_ms: q.total_ms,
                resume_ms: q.resume_ms,
                downtime_ms: q.downtime_ms,
                sent: q.transferred,
                reused: 0,
                wire: q.transferred,
                gbps: size as f64 / (q.total_ms / 1000.0) / 1e9,
                ok: true,
            });
        }
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Machine: {}. One run of `cargo bench --bench remote`, one move per row, over loopback. vmbeam rows: an idle nested guest whose whole memory holds data; total = connect → the destination's STARTED; time-to-resume = connect → the guests run on the destination (STARTED), which for pre-copy is the end of the move and for post-copy comes before the memory; total for post-copy = connect → the destination confirmed the last page; downtime = pause → STARTED (pre-copy: includes hashing every nested guest on both sides). QEMU rows: a paused VM of the same size, RAM holding the same pattern, QEMU's own migration; for postcopy-ram, time-to-resume = `migrate` → status `postcopy-active` first seen.\n",
        machine()
    );
    t += "| memory | what | total (ms) | time-to-resume (ms) | downtime (ms) | memory sent | not sent (reuse) | bytes on the wire | GB/s of guest memory | checksums equal |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.2} | {} |",
            human(r.size),
            r.what,
            r.total_ms,
            r.resume_ms,
            r.downtime_ms,
            human(r.sent),
            human(r.reused),
            human(r.wire),
            r.gbps,
            if r.ok { "yes" } else { "NO" }
        );
    }
    for &size in &sizes {
        let get = |w: &str| {
            rows.iter()
                .find(|r| r.size == size && r.what.starts_with(w))
        };
        if let (Some(v), Some(q)) = (get("vmbeam pre-copy, TCP"), get("QEMU")) {
            let _ = writeln!(
                t,
                "\nAt {}: vmbeam pre-copy moves {:.2} GB/s of guest memory and takes {:.2}x the total time of QEMU's migration of a paused VM.",
                human(size),
                v.gbps,
                v.total_ms / q.total_ms
            );
        }
        if let (Some(v), Some(p)) = (get("vmbeam pre-copy, TCP"), get("vmbeam post-copy")) {
            let _ = writeln!(
                t,
                "At {}: vmbeam post-copy resumes the VM after {:.4}x the time pre-copy takes ({:.1} vs {:.1} ms), with {:.2}x its downtime, and takes {:.2}x its total time.",
                human(size),
                p.resume_ms / v.resume_ms,
                p.resume_ms,
                v.resume_ms,
                p.downtime_ms / v.downtime_ms.max(1e-9),
                p.total_ms / v.total_ms
            );
        }
        if let (Some(p), Some(q)) = (get("vmbeam post-copy"), get("QEMU postcopy-ram")) {
            let _ = writeln!(
                t,
                "At {}: vmbeam post-copy's time-to-resume is {:.3}x QEMU postcopy-ram's, its total time {:.2}x.",
                human(size),
                p.resume_ms / q.resume_ms.max(1e-9),
                p.total_ms / q.total_ms
            );
        }
        if let (Some(v), Some(b)) = (get("vmbeam pre-copy, TCP"), get("vmbeam pre-copy back")) {
            let _ = writeln!(
                t,
                "At {}: the return trip sent {:.4}x the guest memory of the first trip ({} vs {}); reuse saved {}.",
                human(size),
                b.sent as f64 / v.sent.max(1) as f64,
                human(b.sent),
                human(v.sent),
                human(b.reused)
            );
        }
    }
    print!("{t}");
    write_section("remote-bench", "Host-to-host migration", &t);
}
