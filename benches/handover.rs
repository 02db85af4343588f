//! Zero-copy handover time and downtime against nested memory size.
//!
//! For each size (256 MiB, 1 GiB, 4 GiB, 16 GiB by default; override with
//! `VMBEAM_BENCH_SIZES=256M,1G`) one nested memtouch guest is started, L0
//! fills its whole memory with the pattern (so every page is really backed),
//! the guest runs, and the host VM is rejuvenated `VMBEAM_BENCH_REPS` times
//! (default 3) in a row, without verification hashing so the timings are the
//! handover alone. One extra verified rejuvenation per size checks, from
//! `/proc/self/maps`, that the successor maps the guest's own memfd pages.
//! The table (medians, and the ratio of each size to the smallest, side by
//! side from one run) is printed and written to `docs/benchmarks.md`
//! between markers.
//!
//! Run: `cargo bench --bench handover`.

use std::time::{Duration, Instant};

use vmbeam_vmm::config::{VmmConfig, Workload};

#[path = "common.rs"]
mod common;
use common::*;
use vmbeam_vmm::migration::rejuvenate::{RejuvenateOptions, Report};
use vmbeam_vmm::vmm::Vmm;

struct Row {
    size: u64,
    fill_s: f64,
    boot_ms: f64,
    handover_ms: f64,
    total_ms: f64,
    downtime_ms: f64,
    cpu_ms: f64,
    released: u64,
    copied: u64,
    verified: bool,
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn wait_rounds(vmm: &Vmm, lines: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = vmm.status();
        if st
            .host_vms
            .iter()
            .flat_map(|v| &v.nested)
            .all(|n| n.console_lines >= lines)
            && !st.host_vms.iter().all(|v| v.nested.is_empty())
        {
            return;
        }
        assert!(Instant::now() < deadline, "guest made no progress");
        assert!(vmm.failure().is_none(), "{:?}", vmm.failure());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn measure(size: u64, reps: usize) -> Row {
    let config = VmmConfig {
        nested: 1,
        nested_mem: size,
        workloads: vec![Workload::Memtouch],
        quiet: true,
        ..Default::default()
    };
    let vmm = Vmm::new(config, vmbeam::images(None).unwrap()).unwrap();
    let t = Instant::now();
    vmm.start("bench").unwrap();
    // start line + one round: the fill of the whole memory has completed.
    wait_rounds(&vmm, 2);
    let fill_s = t.elapsed().as_secs_f64();
    let mut reports: Vec<Report> = Vec::new();
    let mut lines = 2;
    for _ in 0..reps {
        let r = vmm
            .rejuvenate(
                None,
                &RejuvenateOptions {
                    verify: false,
                    ..Default::default()
                },
            )
            .unwrap();
        lines += 1;
        wait_rounds(&vmm, lines);
        reports.push(r);
    }
    let pages = moves::guest_pages(&vmm.current(None).unwrap(), false);
    let verified = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    let same = moves::same_pages(&vmm.current(None).unwrap(), &pages);
    if let Err(e) = &same {
        eprintln!("bench: {e}");
    }
    let ok = same.is_ok() && verified.guests.iter().all(|g| g.running_after);
    vmm.shutdown();
    Row {
        size,
        fill_s,
        boot_ms: median(reports.iter().map(|r| r.boot_ms).collect()),
        handover_ms: median(reports.iter().map(|r| r.handover_ms).collect()),
        total_ms: median(reports.iter().map(|r| r.total_ms).collect()),
        downtime_ms: median(
            reports
                .iter()
                .map(|r| r.guests[0].downtime_us as f64 / 1000.0)
                .collect(),
        ),
        cpu_ms: median(reports.iter().map(|r| r.cpu_ms).collect()),
        released: reports[0].released_bytes,
        copied: reports.iter().map(|r| r.bytes_copied).sum(),
        verified: ok,
    }
}

fn main() {
    if !kvm_or_skip("bench handover") {
        return;
    }
    let (sizes, reps) = sizes_and_reps("256M,1G,4G,16G", 3);
    let mut rows = Vec::new();
    for &s in &sizes {
        eprintln!("bench: nested guest of {} ...", human(s));
        let r = measure(s, reps);
        eprintln!(
            "bench: {}: handover {:.2} ms, downtime {:.2} ms",
            human(s),
            r.handover_ms,
            r.downtime_ms
        );
        rows.push(r);
    }
    let base = &rows[0];
    let mut t = String::new();
    t += &format!(
        "Machine: {}. One run of `cargo bench --bench handover` ({} rejuvenations per size, medians; verification hashing off in the timed runs).\n\n",
        machine(),
        reps
    );
    t += "| nested memory | fill (s) | successor boot (ms) | handover (ms) | downtime (ms) | total (ms) | L0 CPU (ms) | bytes copied | released | checksums equal | handover vs smallest | downtime vs smallest |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        t += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {:.2}x | {:.2}x |\n",
            human(r.size),
            r.fill_s,
            r.boot_ms,
            r.handover_ms,
            r.downtime_ms,
            r.total_ms,
            r.cpu_ms,
            r.copied,
            human(r.released),
            if r.verified { "yes" } else { "NO" },
            r.handover_ms / base.handover_ms,
            r.downtime_ms / base.downtime_ms,
        );
    }
    println!("{t}");
    write_section(
        "handover-bench",
        "Zero-copy handover vs nested memory size",
        &t,
    );
}
