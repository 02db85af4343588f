//! `vmbeam demo`: a self-contained tour — boot a guest hypervisor with
//! nested guests, let them work, rejuvenate, check they kept working, and
//! print what happened in tables a person can read.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmbeam_vmm::control::inspect::Inspection;
use vmbeam_vmm::migration::rejuvenate::{RejuvenateOptions, Report};
use vmbeam_vmm::vmm::{Status, Vmm};

use crate::cli::DemoArgs;
use crate::run::{build_vmm, RunError};

/// A size for people, always in MiB so that a report's sizes compare at
/// a glance.
fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Prints the status tree: host → host VM lines (generation, uptime,
/// health, retired generations) → nested guests (memory, state, which
/// guest hypervisor runs them now, moves).
pub fn print_status(s: &Status) {
    if !s.policy.is_empty() {
        println!(
            "host: vmbeam {}, rejuvenation policy: {}",
            s.version, s.policy
        );
    }
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
            let h = |k: &str| *vm.health.get(k).unwrap_or(&0);
            let (free, used) = (h("pool_free_bytes"), h("pool_used_bytes"));
            println!(
                "  health: pool free {} of {} ({:.1}%), used {}, leaked {}, {} errors",
                mib(free),
                mib(free + used),
                pct(free, free + used),
                mib(used),
                mib(h("leaked_bytes")),
                h("errors")
            );
            println!(
                "          L1 up {:.1} s, {} nested guests, {} nested ops, {} exits handled ({} reports)",
                h("uptime_ms") as f64 / 1000.0,
                h("nested_guests"),
                h("nested_ops"),
                h("exits_handled"),
                vm.health_reports
            );
        } else {
            println!("  health: no report from the guest hypervisor yet");
        }
        if vm.age_leak_pages > 0 {
            println!(
                "  aging injector: {} page(s) leaked per nested run",
                vm.age_leak_pages
            );
        }
        for r in &vm.retired {
            println!(
                "  retired: generation {} after {:.1} s ({}{}){}",
                r.generation,
                r.uptime_ms as f64 / 1000.0,
                r.reason,
                r.detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default(),
                r.health
                    .get("leaked_bytes")
                    .map(|l| format!(", had leaked {}", mib(*l)))
                    .unwrap_or_default()
            );
        }
        for n in &vm.nested {
            println!(
                "  └─ {:<8} {:>9}  {:<8} on {}/g{}  moves {}  runs {:>6}  exits {:>6}  console lines {:>5}",
                n.name,
                mib(n.mem_bytes),
                n.state,
                if n.host_vm.is_empty() { &vm.name } else { &n.host_vm },
                n.generation,
                n.moves,
                n.runs,
                n.exits,
                n.console_lines,
            );
            for d in &n.devices {
                let c = &d.counters;
                let last = d
                    .last_error
                    .as_ref()
                    .map(|e| format!(" (last: {e})"))
                    .unwrap_or_default();
                if d.kind == "virtio-net" {
                    println!(
                        "       {} at {:#x} irq {}: {}; frames rx {} ({})  tx {} ({})  drops {}  errors {}  resets needed {}{}",
                        d.kind,
                        d.mmio_base,
                        d.irq,
                        d.backend,
                        c.rx_frames,
                        mib(c.bytes_in),
                        c.tx_frames,
                        mib(c.bytes_out),
                        c.drops,
                        c.errors,
                        c.resets_needed,
                        last
                    );
                    continue;
                }
                println!(
                    "       {} at {:#x} irq {}: {}; requests {}  read {}  written {}  errors {}  resets needed {}{}",
                    d.kind,
                    d.mmio_base,
                    d.irq,
                    d.backend,
                    c.requests,
                    mib(c.bytes_in),
                    mib(c.bytes_out),
                    c.errors,
                    c.resets_needed,
                    last
                );
            }
        }
    }
    for j in &s.jobs {
        println!("running: {}", crate::follow::describe(j));
    }
}

/// Prints an inspection: where the guest runs, its registers, and a hex
/// dump of the bytes read.
pub fn print_inspection(i: &Inspection) {
    println!(
        "{} ({}) on {}/g{}, moved {} time(s)",
        i.guest, i.state, i.host_vm, i.generation, i.moves
    );
    match &i.regs {
        Some(r) => {
            println!(
                "  rip {:#018x}  rsp {:#018x}  rflags {:#x}  cs {:#x}",
                r.rip, r.rsp, r.rflags, r.cs
            );
            println!(
                "  rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}",
                r.rax, r.rbx, r.rcx, r.rdx
            );
            println!(
                "  rsi {:#018x}  rdi {:#018x}  rbp {:#018x}  r8  {:#018x}",
                r.rsi, r.rdi, r.rbp, r.r8
            );
            println!(
                "  cr0 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}  tsc {}",
                r.cr0, r.cr3, r.cr4, r.efer, r.tsc
            );
        }
        None => println!("  registers: {}", i.regs_status),
    }
    for (k, chunk) in i.bytes().chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "  {:#010x}  {:<47}  |{}|",
            i.gpa + k as u64 * 16,
            hex.join(" "),
            text
        );
    }
}

/// Prints a rejuvenation report.
pub fn print_report(r: &Report) {
    if r.mode == "tcp" {
        println!(
            "migrated {} (generation {}) to the destination over TCP",
            r.vm, r.from_generation
        );
    } else {
        println!(
            "rejuvenated {}: generation {} -> {} ({})",
            r.vm, r.from_generation, r.to_generation, r.mode
        );
    }
    println!("  successor boot  {:>10.2} ms", r.boot_ms);
    println!("  handover        {:>10.2} ms", r.handover_ms);
    println!("  total           {:>10.2} ms", r.total_ms);
    println!("  bytes copied    {:>10}", mib(r.bytes_copied));
    println!("  channel bytes   {:>10}", mib(r.channel_bytes));
    println!("  released        {:>10}", mib(r.released_bytes));
    if let Some(p) = &r.precopy {
        println!(
            "  pre-copy        {:>10} live in {} round(s), {} page(s) left at the last, {}",
            mib(p.live_bytes),
            p.rounds,
            p.remaining_pages,
            if p.converged {
                "within the downtime budget"
            } else {
                "stopped at the round limit"
            }
        );
    }
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
        mode: args.mode.into(),
        batch: args.batch,
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
        ok &= r.bytes_copied == 0
            || vmbeam_vmm::migration::rejuvenate::Mode::from(args.mode)
                != vmbeam_vmm::migration::rejuvenate::Mode::ZeroCopy;
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
