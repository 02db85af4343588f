//! Zero-copy handover time and downtime against nested memory size, and
//! against the number of guests moved in one batch.
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
//! The second table moves 1, 4, 16 and 64 guests of 16 MiB (override with
//! `VMBEAM_BENCH_GUESTS=1,4,16`), half memtouch and half ticker, with both
//! protocols side by side in one run: the channel protocol (every guest
//! paused for the whole handover) and the batch handover (each guest moves
//! on its own). For each it reports the medians over the rejuvenations of
//! the longest and the median guest pause, boot and total time, and the
//! ratio of the longest pause to the single guest's.
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
    batch: bool,
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

fn measure(size: u64, reps: usize, batch: bool) -> Row {
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
                    batch,
                    ..Default::default()
                },
            )
            .unwrap();
        lines += 1;
        wait_rounds(&vmm, lines);
        reports.push(r);
    }
    let pages = moves::guest_pages(&vmm.current(None).unwrap(), false);
    let verified = vmm
        .rejuvenate(
            None,
            &RejuvenateOptions {
                batch,
                ..Default::default()
            },
        )
        .unwrap();
    let same = moves::same_pages(&vmm.current(None).unwrap(), &pages);
    if let Err(e) = &same {
        eprintln!("bench: {e}");
    }
    let ok = same.is_ok()
        && verified.guests.iter().all(|g| g.running_after)
        && verified
            .guests
            .iter()
            .all(|g| g.checksum_before == g.checksum_after);
    vmm.shutdown();
    Row {
        size,
        batch,
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

/// One line of the table over guest counts.
struct CountRow {
    guests: u32,
    batch: bool,
    boot_ms: f64,
    total_ms: f64,
    max_pause_ms: f64,
    median_pause_ms: f64,
    all_moved: bool,
}

fn measure_count(guests: u32, reps: usize) -> Vec<CountRow> {
    let config = VmmConfig {
        nested: guests,
        nested_mem: 16 << 20,
        pool: Some((guests as u64 * 16 + 64) << 20),
        workloads: vec![Workload::Memtouch, Workload::Ticker],
        quiet: true,
        ..Default::default()
    };
    let vmm = Vmm::new(config, vmbeam::images(None).unwrap()).unwrap();
    vmm.start("bench").unwrap();
    let mut lines = 3;
    wait_rounds(&vmm, lines);
    let mut out = Vec::new();
    for batch in [false, true] {
        let mut reports: Vec<Report> = Vec::new();
        for _ in 0..reps {
            let r = vmm
                .rejuvenate(
                    None,
                    &RejuvenateOptions {
                        verify: false,
                        batch,
                        timeout: Duration::from_secs(120),
                        ..Default::default()
                    },
                )
                .unwrap();
            lines += 2;
            wait_rounds(&vmm, lines);
            reports.push(r);
        }
        let pauses = |r: &Report| -> Vec<f64> {
            r.guests
                .iter()
                .map(|g| g.downtime_us as f64 / 1000.0)
                .collect()
        };
        out.push(CountRow {
            guests,
            batch,
            boot_ms: median(reports.iter().map(|r| r.boot_ms).collect()),
            total_ms: median(reports.iter().map(|r| r.total_ms).collect()),
            max_pause_ms: median(
                reports
                    .iter()
                    .map(|r| pauses(r).into_iter().fold(0.0, f64::max))
                    .collect(),
            ),
            median_pause_ms: median(reports.iter().map(|r| median(pauses(r))).collect()),
            all_moved: reports.iter().all(|r| {
                r.guests.len() == guests as usize
                    && r.bytes_copied == 0
                    && r.guests.iter().all(|g| g.running_after)
            }),
        });
    }
    vmm.shutdown();
    out
}

fn guest_counts() -> Vec<u32> {
    std::env::var("VMBEAM_BENCH_GUESTS")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// The 1-minute load average (other work sharing the cores).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn count_table(reps: usize) -> String {
    let load_before = load();
    let mut rows: Vec<CountRow> = Vec::new();
    for n in guest_counts() {
        eprintln!("bench: {n} guests of 16 MiB ...");
        for r in measure_count(n, reps) {
            eprintln!(
                "bench: {n} guests, {}: longest pause {:.3} ms, total {:.1} ms",
                if r.batch { "batch" } else { "channel" },
                r.max_pause_ms,
                r.total_ms
            );
            rows.push(r);
        }
    }
    let mut t = String::new();
    t += &format!(
        "Machine: {}; load average {} at the start and {} at the end of the run. One run of `cargo bench --bench handover` ({} rejuvenations per line, medians; verification hashing off in the timed runs; downtime is the guest-visible pause, from the guest's last exit under the aged guest hypervisor to its first entry under the successor, nothing subtracted).\n\n",
        machine(),
        load_before,
        load(),
        reps
    );
    t += "| guests (16 MiB each) | protocol | successor boot (ms) | total (ms) | longest pause (ms) | median pause (ms) | longest pause vs 1 guest | all moved, 0 bytes copied |\n";
    t += "|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let one = rows
            .iter()
            .find(|x| x.batch == r.batch && x.guests == 1)
            .map(|x| x.max_pause_ms);
        t += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {} | {} |\n",
            r.guests,
            if r.batch { "batch" } else { "channel" },
            r.boot_ms,
            r.total_ms,
            r.max_pause_ms,
            r.median_pause_ms,
            one.map(|o| format!("{:.2}x", r.max_pause_ms / o))
                .unwrap_or_else(|| "-".into()),
            if r.all_moved { "yes" } else { "NO" },
        );
    }
    t
}

fn main() {
    if !kvm_or_skip("bench handover") {
        return;
    }
    let only_counts = std::env::var("VMBEAM_BENCH_SIZES").as_deref() == Ok("none");
    let (sizes, reps) = if only_counts {
        (
            Vec::new(),
            std::env::var("VMBEAM_BENCH_REPS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3),
        )
    } else {
        sizes_and_reps("256M,1G,4G,16G", 3)
    };
    let counts = count_table(reps);
    println!("{counts}");
    write_section(
        "handover-count-bench",
        "Batch rejuvenation: downtime against the number of guests",
        &counts,
    );
    if only_counts {
        return;
    }
    let mut rows = Vec::new();
    for &s in &sizes {
        for batch in [false, true] {
            eprintln!("bench: nested guest of {} ...", human(s));
            let r = measure(s, reps, batch);
            eprintln!(
                "bench: {}: handover {:.2} ms, downtime {:.2} ms",
                human(s),
                r.handover_ms,
                r.downtime_ms
            );
            rows.push(r);
        }
    }
    let base = &rows[0];
    let mut t = String::new();
    t += &format!(
        "Machine: {}. One run of `cargo bench --bench handover` ({} rejuvenations per size, medians; verification hashing off in the timed runs).\n\n",
        machine(),
        reps
    );
    t += "| nested memory | protocol | fill (s) | successor boot (ms) | handover (ms) | downtime (ms) | total (ms) | L0 CPU (ms) | bytes copied | released | checksums equal | handover vs smallest | downtime vs smallest |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let base = rows.iter().find(|x| x.batch == r.batch).unwrap_or(base);
        t += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {:.2}x | {:.2}x |\n",
            human(r.size),
            if r.batch { "batch" } else { "channel" },
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
