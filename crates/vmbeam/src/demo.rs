//! `vmbeam demo`: a self-contained tour — boot a guest hypervisor with
//! nested guests, let them work, rejuvenate, check they kept working, and
//! print what happened in tables a person can read.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmbeam_vmm::rejuvenate::{RejuvenateOptions, Report};
use vmbeam_vmm::vmm::{Status, Vmm};

use crate::cli::DemoArgs;
use crate::run::{build_vmm, RunError};

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Prints the status tree.
pub fn print_status(s: &Status) {
    for vm in &s.host_vms {
        println!(
            "host VM {} (generation {}, {}, up {:.1} s, {} hypercalls)",
            vm.name,
            vm.generation,
            vm.status,
            vm.uptime_ms as f64 / 1000.0,
            vm.hypercalls
        );
        if !vm.health.is_empty() {
            let h = &vm.health;
            println!(
                "  health: pool free {} used {}, {} nested ops, {} errors",
                mib(*h.get("pool_free_bytes").unwrap_or(&0)),
                mib(*h.get("pool_used_bytes").unwrap_or(&0)),
                h.get("nested_ops").unwrap_or(&0),
                h.get("errors").unwrap_or(&0)
            );
        }
        for n in &vm.nested {
            println!(
                "  └─ {:<8} {:>9}  {:<8} runs {:>6}  exits {:>6}  console lines {:>5}  moves {}",
                n.name,
                mib(n.mem_bytes),
                n.state,
                n.runs,
                n.exits,
                n.console_lines,
                n.moves
            );
        }
    }
}

/// Prints a rejuvenation report.
pub fn print_report(r: &Report) {
    println!(
        "rejuvenated {}: generation {} -> {} ({})",
        r.vm, r.from_generation, r.to_generation, r.mode
    );
    println!("  successor boot  {:>10.2} ms", r.boot_ms);
    println!("  handover        {:>10.2} ms", r.handover_ms);
    println!("  total           {:>10.2} ms", r.total_ms);
    println!("  bytes copied    {:>10}", r.bytes_copied);
    println!("  channel bytes   {:>10}", r.channel_bytes);
    println!("  released        {:>10}", mib(r.released_bytes));
    println!(
        "  host RSS        {} -> {}",
        mib(r.host_rss_before),
        mib(r.host_rss_after)
    );
    println!("  L0 CPU time     {:>10.2} ms", r.cpu_ms);
    println!(
        "  verify hashing  {:>10.2} ms (not counted as downtime)",
        r.verify_ms
    );
    println!(
        "  {:<8} {:>10} {:>12}  {:<16}  {:<16}  running",
        "guest", "memory", "downtime", "checksum before", "checksum after"
    );
    for g in &r.guests {
        println!(
            "  {:<8} {:>10} {:>9.3} ms  {:<16}  {:<16}  {}",
            g.name,
            mib(g.mem_bytes),
            g.downtime_us as f64 / 1000.0,
            g.checksum_before.as_deref().unwrap_or("-"),
            g.checksum_after.as_deref().unwrap_or("-"),
            if g.running_after { "yes" } else { "NO" }
        );
    }
}

/// Waits until at least `count` nested guests exist and each has written
/// `lines` more console lines than in `base`.
pub fn wait_progress(
    vmm: &Vmm,
    base: &Status,
    count: usize,
    lines: u64,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let s = vmm.status();
        let now: Vec<_> = s.host_vms.iter().flat_map(|v| &v.nested).collect();
        let ok = now.len() >= count
            && now.iter().all(|n| {
                let before = base
                    .host_vms
                    .iter()
                    .flat_map(|v| &v.nested)
                    .find(|b| b.name == n.name)
                    .map(|b| b.console_lines)
                    .unwrap_or(0);
                n.console_lines >= before + lines
            });
        if ok {
            return true;
        }
        if vmm.failure().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn tail(dir: &std::path::Path, name: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Runs the demo; returns whether every check held.
pub fn demo(args: &DemoArgs) -> Result<bool, RunError> {
    let mut vmargs = args.vm.clone();
    let dir = vmargs
        .console_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/vmbeam-demo-{}", std::process::id())));
    vmargs.console_dir = Some(dir.clone());
    let vmm = build_vmm(&vmargs, false)?;
    if !args.json {
        println!("vmbeam demo: consoles are written to {}", dir.display());
    }
    let vm = vmm.start("hv0")?;
    if !args.json {
        println!(
            "booted host VM {} with {} nested guest(s) of {}",
            vm.name(),
            vm.spec.nested.len(),
            mib(args.vm.nested_mem)
        );
    }
    let empty = vmm.status();
    let count = args.vm.nested as usize;
    let mut ok = wait_progress(&vmm, &empty, count, 3, Duration::from_secs(120));
    if let Some(m) = vmm.failure() {
        return Err(RunError::GuestFailed(m));
    }
    let before = vmm.status();
    if !args.json {
        println!("\nbefore:");
        print_status(&before);
    }
    let opts = RejuvenateOptions {
        mode: args.mode,
        ..Default::default()
    };
    let mut reports = Vec::new();
    for _ in 0..args.rejuvenations.max(1) {
        let base = vmm.status();
        let r = vmm.rejuvenate(None, &opts)?;
        ok &= r
            .guests
            .iter()
            .all(|g| g.running_after && g.checksum_before == g.checksum_after);
        ok &= r.bytes_copied == 0 || args.mode != vmbeam_vmm::rejuvenate::Mode::ZeroCopy;
        if !args.json {
            println!();
            print_report(&r);
        }
        reports.push(r);
        ok &= wait_progress(&vmm, &base, count, 2, Duration::from_secs(60));
    }
    let after = vmm.status();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "ok": ok, "reports": reports, "status": after })
        );
    } else {
        println!("\nafter:");
        print_status(&after);
        for n in after.host_vms.iter().flat_map(|v| &v.nested) {
            println!("\nlast lines of {}'s console:", n.name);
            for l in tail(&dir, &n.name, 3) {
                println!("  {l}");
            }
        }
        println!(
            "\n{}",
            if ok {
                "demo OK: every nested guest moved without copying memory and kept running"
            } else {
                "demo FAILED: see above"
            }
        );
    }
    vmm.shutdown();
    Ok(ok)
}
