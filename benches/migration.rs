//! Zero-copy against copy-based migration, side by side in one run.
//!
//! For each nested memory size (default 256 MiB, 1 GiB, 4 GiB; override
//! with `VMBEAM_BENCH_SIZES`) and each workload — idle (memtouch that halts
//! after one round) and dirtying (memtouch that keeps rewriting pages) — one
//! host VM with one nested guest is started and L0 fills the guest's whole
//! memory, then the guest is moved `VMBEAM_BENCH_REPS` times (default 2) with
//! each mode in turn: zero-copy, copy (stop-and-copy), precopy (dirty
//! logging, 300 ms budget). Copy modes need twice the guest's memory while
//! they run, so sizes above a third of host memory are skipped for them.
//! Medians go to a table and an SVG chart in `docs/`, and the headline ratio
//! (copy vs zero-copy at the largest size) is printed.
//!
//! Run: `cargo bench --bench migration`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::{VmmConfig, Workload};

#[path = "common.rs"]
mod common;
#[path = "qemu.rs"]
mod qemu;
use common::*;
use vmbeam_vmm::migration::rejuvenate::{Mode, RejuvenateOptions, Report};
use vmbeam_vmm::vmm::Vmm;

/// Pattern seed L0 fills the first nested guest's bulk with.
const BULK_SEED: u64 = 0x5eed_0000;

#[derive(Clone)]
struct Cell {
    size: u64,
    workload: &'static str,
    mode: &'static str,
    total_ms: f64,
    handover_ms: f64,
    downtime_ms: f64,
    copied: u64,
    cpu_ms: f64,
    ok: bool,
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn wait_lines(vmm: &Vmm, lines: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = vmm.status();
        let n: Vec<_> = st.host_vms.iter().flat_map(|v| &v.nested).collect();
        if !n.is_empty() && n.iter().all(|n| n.console_lines >= lines) {
            return;
        }
        assert!(Instant::now() < deadline, "guest made no progress");
        assert!(vmm.failure().is_none(), "{:?}", vmm.failure());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_size(size: u64, workload: &'static str, reps: usize, modes: &[Mode]) -> Vec<Cell> {
    let config = VmmConfig {
        nested: 1,
        nested_mem: size,
        workloads: vec![Workload::Memtouch],
        workload_param: if workload == "idle" { 1 } else { 0 },
        quiet: true,
        ..Default::default()
    };
    let vmm = Vmm::new(config, vmbeam::images(None).unwrap()).unwrap();
    vmm.start("bench").unwrap();
    wait_lines(&vmm, 2);
    let mut by_mode: Vec<(Mode, Vec<Report>)> = modes.iter().map(|m| (*m, Vec::new())).collect();
    for _ in 0..reps {
        for (mode, reports) in by_mode.iter_mut() {
            let r = vmm
                .rejuvenate(
                    None,
                    &RejuvenateOptions {
                        mode: *mode,
                        verify: false,
                        ..Default::default()
                    },
                )
                .unwrap();
            reports.push(r);
        }
    }
    // One verified move per mode, checked from /proc/self: zero-copy keeps
    // the guest's own memfd pages; a copy puts them in new files, every
    // word of the bulk intact.
    let mut ok = Vec::new();
    for m in modes {
        let pages = moves::guest_pages(&vmm.current(None).unwrap(), false);
        let fds = procfs::memfds();
        let r = vmm
            .rejuvenate(
                None,
                &RejuvenateOptions {
                    mode: *m,
                    ..Default::default()
                },
            )
            .unwrap();
        let succ = vmm.current(None).unwrap();
        let evidence = match m {
            Mode::ZeroCopy => moves::same_pages(&succ, &pages).map(|_| ()),
            Mode::Copy | Mode::Precopy => moves::in_new_files(&succ, &fds)
                .and_then(|_| moves::bulk_intact(&succ, "l2-0", BULK_SEED))
                .map(|_| ()),
        };
        if let Err(e) = &evidence {
            eprintln!("bench: {}: {e}", m.as_str());
        }
        ok.push(evidence.is_ok() && r.guests.iter().all(|g| g.running_after));
    }
    // tcp: the whole host VM goes to another VMM (in this process, over
    // loopback) and back, one move per rep.
    let (tcp, tcp_intact) = if modes.len() > 1 {
        tcp_moves(vmm, reps)
    } else {
        (Vec::new(), false)
    };
    let tcp_ok = !tcp.is_empty();
    let mut by_mode: Vec<(&'static str, Vec<Report>)> =
        by_mode.into_iter().map(|(m, r)| (m.as_str(), r)).collect();
    if tcp_ok {
        by_mode.push(("tcp", tcp));
        ok.push(tcp_intact);
    }
    by_mode
        .into_iter()
        .zip(ok)
        .map(|((mode, rs), ok)| Cell {
            size,
            workload,
            mode,
            total_ms: median(rs.iter().map(|r| r.total_ms).collect()),
            handover_ms: median(rs.iter().map(|r| r.handover_ms).collect()),
            downtime_ms: median(
                rs.iter()
                    .map(|r| r.guests[0].downtime_us as f64 / 1000.0)
                    .collect(),
            ),
            copied: rs[0].bytes_copied,
            cpu_ms: median(rs.iter().map(|r| r.cpu_ms).collect()),
            ok,
        })
        .collect()
}

fn listener(vmm: Arc<Vmm>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            if let Ok(vm) =
                vmbeam_vmm::migration::remote::receive(&vmm.shared, s, &|n| vmm.has_line(n))
            {
                vmm.add_line(vm);
            }
        }
    });
    addr
}

/// Moves the host VM back and forth over loopback `reps` times; returns the
/// reports and whether the guest's bulk arrived intact at the last
/// destination (every word read from outside L0).
fn tcp_moves(a: Vmm, reps: usize) -> (Vec<Report>, bool) {
    let a = Arc::new(a);
    let b = Arc::new(
        Vmm::new(
            VmmConfig {
                quiet: true,
                ..Default::default()
            },
            vmbeam::images(None).unwrap(),
        )
        .unwrap(),
    );
    let (to_a, to_b) = (listener(a.clone()), listener(b.clone()));
    let mut out = Vec::new();
    for i in 0..reps {
        let (from, to) = if i % 2 == 0 { (&a, &to_b) } else { (&b, &to_a) };
        let r = from.migrate(None, to, Duration::from_millis(300)).unwrap();
        out.push(r);
        // The receiver takes the VM over on its listener thread after COMMIT.
        let dest = if i % 2 == 0 { &b } else { &a };
        let t = Instant::now();
        while !dest.has_line("bench") {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the receiver never started it"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = if reps % 2 == 1 { &b } else { &a };
    let intact = match last.current(Some("bench")) {
        Ok(vm) => moves::bulk_intact(&vm, "l2-0", BULK_SEED),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &intact {
        eprintln!("bench: tcp: {e}");
    }
    a.shutdown();
    b.shutdown();
    (out, intact.is_ok())
}

fn svg(cells: &[Cell], sizes: &[u64]) -> String {
    // Grouped bars: total time (log scale) per size, one bar per mode, dirtying workload.
    let modes = ["zero-copy", "copy", "precopy", "tcp"];
    let colors = ["#2a7", "#c33", "#e90", "#36c"];
    let (w, h, left, bottom) = (720.0, 360.0, 70.0, 40.0);
    let max = cells
        .iter()
        .map(|c| c.total_ms)
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(1.0);
    let y = |v: f64| h - bottom - (v.max(1.0).log10() / max) * (h - bottom - 20.0);
    let mut s = String::new();
    let _ = writeln!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(s, "<text x=\"{}\" y=\"14\" text-anchor=\"middle\">total migration time, dirtying guest (ms, log scale)</text>", w / 2.0);
    for e in 0..=(max as i32) {
        let v = 10f64.powi(e);
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", w - 10.0, y(v), y(v), left - 6.0, y(v) + 4.0, v);
    }
    let group = (w - left - 20.0) / sizes.len() as f64;
    for (gi, sz) in sizes.iter().enumerate() {
        let x0 = left + gi as f64 * group + 10.0;
        let bw = (group - 20.0) / 4.0;
        for (mi, m) in modes.iter().enumerate() {
            if let Some(c) = cells
                .iter()
                .find(|c| c.size == *sz && c.mode == *m && c.workload == "dirtying")
            {
                let x = x0 + mi as f64 * bw;
                let top = y(c.total_ms);
                let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.0}</text>", bw - 4.0, h - bottom - top, colors[mi], x + bw / 2.0 - 2.0, top - 3.0, c.total_ms);
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x0 + group / 2.0 - 10.0,
            h - bottom + 16.0,
            human(*sz)
        );
    }
    for (mi, m) in modes.iter().enumerate() {
        let _ = writeln!(s, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>", left + 10.0 + mi as f64 * 110.0, h - 14.0, colors[mi], left + 24.0 + mi as f64 * 110.0, h - 5.0, m);
    }
    s += "</svg>\n";
    s
}

fn main() {
    if !kvm_or_skip("bench migration") {
        return;
    }
    let (sizes, reps) = sizes_and_reps("256M,1G,4G", 2);
    let mem = host_mem();
    let mut cells = Vec::new();
    for &size in &sizes {
        for workload in ["idle", "dirtying"] {
            let modes: Vec<Mode> = if size * 3 <= mem {
                vec![Mode::ZeroCopy, Mode::Copy, Mode::Precopy]
            } else {
                eprintln!(
                    "bench: {}: copy modes skipped (need 2x the guest's memory)",
                    human(size)
                );
                vec![Mode::ZeroCopy]
            };
            eprintln!("bench: {} {workload} ...", human(size));
            cells.extend(run_size(size, workload, reps, &modes));
        }
        if size * 3 <= mem {
            let fill = |path: &std::path::Path, len: u64| {
                use std::io::Write as _;
                let mut f = std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(path).unwrap(),
                );
                let seed = 0x5eed_0000;
                for a in (0..len).step_by(8) {
                    f.write_all(&vmbeam_abi::checksum::pattern_word(seed, a).to_le_bytes())
                        .unwrap();
                }
            };
            for q in qemu::measure(size, &fill) {
                cells.push(Cell {
                    size,
                    workload: "paused",
                    mode: if q.variant == "normal" {
                        "QEMU"
                    } else {
                        "QEMU x-ignore-shared"
                    },
                    total_ms: q.total_ms,
                    handover_ms: q.total_ms,
                    downtime_ms: q.downtime_ms,
                    copied: q.transferred,
                    cpu_ms: q.cpu_ms,
                    ok: true,
                });
            }
        }
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Machine: {}. One run of `cargo bench --bench migration`, {reps} moves per mode and size (medians), verification hashing off in the timed moves (one verified move per mode is checked from /proc/self: zero-copy keeps the guest's own memfd pages, a copy lands in new memfds with every bulk word intact, and so does the last tcp move).\n",
        machine()
    );
    t += "| memory | workload | mode | total (ms) | handover (ms) | downtime (ms) | bytes copied | L0 CPU (ms) | checksums equal | total vs zero-copy | downtime vs zero-copy |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for c in &cells {
        let zc = cells
            .iter()
            .find(|z| z.size == c.size && z.workload == c.workload && z.mode == "zero-copy")
            .or_else(|| {
                cells
                    .iter()
                    .find(|z| z.size == c.size && z.workload == "idle" && z.mode == "zero-copy")
            })
            .unwrap();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {} | {:.1}x | {:.1}x |",
            human(c.size),
            c.workload,
            c.mode,
            c.total_ms,
            c.handover_ms,
            c.downtime_ms,
            human(c.copied),
            c.cpu_ms,
            if c.ok { "yes" } else { "NO" },
            c.total_ms / zc.total_ms,
            c.downtime_ms / zc.downtime_ms.max(0.001),
        );
    }
    let biggest = sizes
        .iter()
        .copied()
        .filter(|s| cells.iter().any(|c| c.size == *s && c.mode == "copy"))
        .max();
    if let Some(b) = biggest {
        let get = |m: &str| {
            cells
                .iter()
                .find(|c| c.size == b && c.mode == m && c.workload == "dirtying")
                .unwrap()
        };
        let (z, c, p) = (get("zero-copy"), get("copy"), get("precopy"));
        let tcp = cells
            .iter()
            .find(|x| x.size == b && x.mode == "tcp" && x.workload == "dirtying");
        let _ = writeln!(
            t,
            "\nHeadline at {} (dirtying guest): copy takes {:.1}x the total time of zero-copy ({:.1} ms vs {:.1} ms), {:.1}x its downtime and {:.1}x its L0 CPU time; pre-copy {:.1}x the total time and {:.1}x the downtime{}; zero-copy copies 0 bytes against {} (copy) and {} (pre-copy).\n",
            human(b),
            c.total_ms / z.total_ms,
            c.total_ms,
            z.total_ms,
            c.downtime_ms / z.downtime_ms.max(0.001),
            c.cpu_ms / z.cpu_ms.max(0.001),
            p.total_ms / z.total_ms,
            p.downtime_ms / z.downtime_ms.max(0.001),
            tcp.map(|x| format!("; tcp (whole host VM to another VMM over loopback) {:.1}x the total time", x.total_ms / z.total_ms))
                .unwrap_or_default(),
            human(c.copied),
            human(p.copied)
        );
    }
    if qemu::qemu().is_none() {
        t += "\nQEMU reference: not measured, `qemu-system-x86_64` is not installed on this machine.\n";
    } else {
        t += "\nQEMU rows: a paused QEMU VM (q35) whose RAM is a shared memory-backend-file holding the same pattern, migrated locally over a Unix socket; `x-ignore-shared` leaves the shared RAM unsent. They are compared with vmbeam's idle (halted) guest of the same size; QEMU's CPU column is the CPU time of both QEMU processes.\n";
    }
    t += "\n![total migration time](migration.svg)\n";
    println!("{t}");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    std::fs::write(docs.join("migration.svg"), svg(&cells, &sizes)).expect("write svg");
    write_section("migration-bench", "Zero-copy vs copy-based migration", &t);
}
