//! Aging is visible and rejuvenation is automatic. With the aging
//! injector on, the guest hypervisor's free pool falls, the policy fires on
//! its own, the guests move without copying, the successor starts fresh,
//! and the events file, `vmbeam status` and `vmbeam inspect` tell the story
//! before and after each move.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use vmbeam::cli::{Cli, Command as Cmd};
use vmbeam_abi::l2::{IMAGE_BASE, L2_MAGIC, STACK_TOP};
use vmbeam_vmm::api::ApiServer;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::control::inspect::Inspection;
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;

const MIB: u64 = 1 << 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbeam"))
}

/// Kills `vmbeam run` if the test fails before shutting it down.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad events line {l}: {e}")))
        .collect()
}

/// Waits for an event matching `pred`, failing early if `vmbeam run` exited.
fn wait_event(
    run: &mut Running,
    path: &Path,
    stderr: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = events(path).into_iter().find(|e| pred(e)) {
            return e;
        }
        if let Some(st) = run.0.try_wait().unwrap() {
            panic!(
                "vmbeam run exited ({st}) before {what}; stderr:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event within {timeout:?}; events so far:\n{}\nstderr:\n{}",
            std::fs::read_to_string(path).unwrap_or_default(),
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli_json(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = bin()
        .args(args)
        .arg("--json")
        .arg("--api-sock")
        .arg(sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmbeam {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cli_text(sock: &Path, args: &[&str]) -> String {
    let out = bin()
        .args(args)
        .arg("--api-sock")
        .arg(sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmbeam {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The boot-parameters page shows the L2 magic and the guest's name.
fn check_boot_params(name: &str, bytes: &[u8]) {
    assert!(bytes.len() >= 24, "{name}: only {} bytes", bytes.len());
    assert_eq!(
        bytes[..8],
        L2_MAGIC.to_le_bytes(),
        "{name}: no L2 magic at 0x1000"
    );
    let n = &bytes[8..24];
    let end = n.iter().position(|&b| b == 0).unwrap_or(16);
    assert_eq!(&n[..end], name.as_bytes());
}

fn rip_in_image(rip: u64) -> bool {
    (IMAGE_BASE..STACK_TOP).contains(&rip)
}

#[test]
fn aging_policy_rejuvenates_on_its_own() {
    if !kvm_or_skip("aging_policy_rejuvenates_on_its_own") {
        return;
    }
    let dir = temp_dir("aging-policy");
    let sock = dir.join("api.sock");
    let ev = dir.join("events.jsonl");
    let stderr = dir.join("stderr.log");
    let child = bin()
        .args([
            "run",
            "--duration",
            "600",
            "--age-leak",
            "2",
            "--rejuvenate-when",
            "free<10%",
            "--console-dir",
        ])
        .arg(&dir)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--events")
        .arg(&ev)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
        .spawn()
        .unwrap();
    let mut run = Running(child);

    let started = wait_event(
        &mut run,
        &ev,
        &stderr,
        Duration::from_secs(120),
        "started",
        |e| e["event"] == "started",
    );
    assert_eq!(started["policy"], "free<10%");
    assert_eq!(started["age_leak_pages"], 2);
    let l1 = wait_console(&dir, "hv0/g1", Duration::from_secs(120), |t| {
        t.contains("aging injector on")
    });
    assert!(l1.contains("leaking 2 page(s)"), "{l1}");

    // Generation 1 reports health, leaks, and the policy fires on its own.
    let fired = wait_event(
        &mut run,
        &ev,
        &stderr,
        Duration::from_secs(300),
        "policy_fired",
        |e| e["event"] == "policy_fired",
    );
    assert_eq!(fired["vm"], "hv0");
    assert_eq!(fired["generation"], 1);
    assert_eq!(fired["rule"], "free");
    let h = &fired["health"];
    let free = h["pool_free_bytes"].as_u64().unwrap();
    let used = h["pool_used_bytes"].as_u64().unwrap();
    let leaked_aged = h["leaked_bytes"].as_u64().unwrap();
    assert!(
        free * 10 < free + used,
        "fired at {free} free of {}",
        free + used
    );
    assert!(leaked_aged > 20 * MIB, "aged L1 leaked only {leaked_aged}");
    assert!(fired["reason"].as_str().unwrap().contains("free<10%"));

    let done = wait_event(
        &mut run,
        &ev,
        &stderr,
        Duration::from_secs(120),
        "rejuvenated",
        |e| e["event"] == "rejuvenated" || e["event"] == "rejuvenate_failed",
    );
    assert_eq!(done["event"], "rejuvenated", "{done}");
    assert_eq!(done["trigger"], "policy");
    let r = &done["report"];
    assert_eq!(r["from_generation"], 1);
    assert_eq!(r["to_generation"], 2);
    let guests = r["guests"].as_array().unwrap();
    assert_eq!(guests.len(), 2);
    for g in guests {
        assert_eq!(g["running_after"], true, "{g}");
        assert_eq!(g["moves"], 1, "{g}");
    }

    // The successor starts fresh: its first report shows (almost) no leak.
    let first = wait_event(
        &mut run,
        &ev,
        &stderr,
        Duration::from_secs(120),
        "health_first of generation 2",
        |e| e["event"] == "health_first" && e["generation"] == 2,
    );
    let leaked_fresh = first["health"]["leaked_bytes"].as_u64().unwrap();
    // ... with the injector still on.
    wait_console(&dir, "hv0/g2", Duration::from_secs(60), |t| {
        t.contains("role=successor") && t.contains("aging injector on: leaking 2 page(s)")
    });
    assert!(
        leaked_fresh < leaked_aged && leaked_fresh <= 8 * MIB,
        "successor's first report already shows {leaked_fresh} bytes leaked"
    );
    let g1_first = events(&ev)
        .into_iter()
        .find(|e| e["event"] == "health_first" && e["generation"] == 1)
        .expect("generation 1 reported health");
    assert!(g1_first["health"]["pool_free_bytes"].as_u64().unwrap() > 0);

    // Status after the move. The policy may already have fired again, so
    // the checks hold for whatever generation runs now.
    let st = cli_json(&sock, &["status"]);
    assert_eq!(st["policy"], "free<10%");
    let vm = &st["host_vms"][0];
    let generation = vm["generation"].as_u64().unwrap();
    assert!(generation >= 2, "{st}");
    assert_eq!(vm["age_leak_pages"], 2);
    let nested = vm["nested"].as_array().unwrap();
    assert_eq!(nested.len(), 2, "{st}");
    for n in nested {
        assert_eq!(n["host_vm"], "hv0", "{n}");
        assert_eq!(n["generation"].as_u64(), Some(generation), "{n}");
        assert_eq!(n["moves"].as_u64(), Some(generation - 1), "{n}");
        assert_eq!(n["mem_bytes"], 16 * MIB);
    }
    let retired = vm["retired"].as_array().unwrap();
    assert_eq!(retired.len() as u64, generation - 1, "{st}");
    assert_eq!(retired[0]["generation"], 1);
    assert_eq!(retired[0]["reason"], "policy");
    assert!(retired[0]["detail"].as_str().unwrap().contains("free<10%"));
    assert!(retired[0]["uptime_ms"].as_u64().unwrap() > 0);
    assert!(retired[0]["health"]["leaked_bytes"].as_u64().unwrap() > 20 * MIB);
    let text = cli_text(&sock, &["status"]);
    assert!(text.contains("rejuvenation policy: free<10%"), "{text}");
    assert!(text.contains("retired: generation 1 after"), "{text}");
    assert!(text.contains("(policy: free nested pool"), "{text}");
    assert!(text.contains("aging injector: 2 page(s)"), "{text}");
    assert!(text.contains("on hv0/g"), "{text}");

    // Inspect after the move: memory and registers of both guests.
    for name in ["l2-0", "l2-1"] {
        let i = cli_json(&sock, &["inspect", name, "--read", "0x1000", "64"]);
        let i: Inspection = serde_json::from_value(i).unwrap();
        assert_eq!(i.len, 64);
        assert_eq!(i.gpa, 0x1000);
        assert!(i.generation >= 2);
        assert_eq!(i.moves + 1, i.generation, "{i:?}");
        check_boot_params(name, &i.bytes());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let i = cli_json(&sock, &["inspect", name]);
            let i: Inspection = serde_json::from_value(i).unwrap();
            assert!(i.hex.is_empty());
            if let Some(r) = i.regs {
                assert_eq!(i.regs_status, "ok");
                assert!(rip_in_image(r.rip), "{name}: rip {:#x}", r.rip);
                break;
            }
            assert_eq!(i.regs_status, "busy", "{i:?}");
            assert!(Instant::now() < deadline, "{name}'s registers stayed busy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let text = cli_text(&sock, &["inspect", "l2-1", "--read", "4096", "32"]);
    assert!(text.contains("l2-1 (running) on hv0/g"), "{text}");
    assert!(text.contains("|2Lmaebmvl2-1"), "{text}");

    let out = bin()
        .args(["shutdown", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmbeam run did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    // Every events line is JSON with an "event" field.
    assert!(events(&ev).iter().all(|e| e["event"].is_string()));
}

fn started(dir: &Path) -> Vmm {
    let vmm = vmm(
        dir,
        VmmConfig {
            nested: 2,
            workloads: vec![Workload::Memtouch, Workload::Ticker],
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    for i in 0..2 {
        wait_console(dir, &format!("l2-{i}"), Duration::from_secs(120), |t| {
            t.lines().count() >= 2
        });
    }
    vmm
}

/// Inspects until the registers are readable (not busy).
fn regs_of(vmm: &Vmm, name: &str) -> (Inspection, vmbeam_vmm::control::inspect::Registers) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let i = vmm.inspect(name, 0x1000, 64).unwrap();
        if let Some(r) = i.regs {
            return (i, r);
        }
        assert_eq!(i.regs_status, "busy");
        assert!(Instant::now() < deadline, "{name}'s registers stayed busy");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_and_inspect_follow_guests_across_moves() {
    if !kvm_or_skip("status_and_inspect_follow_guests_across_moves") {
        return;
    }
    let dir = temp_dir("aging-inspect");
    let vmm = Arc::new(started(&dir));

    // Before the move.
    for name in ["l2-0", "l2-1"] {
        let (i, r) = regs_of(&vmm, name);
        assert_eq!((i.host_vm.as_str(), i.generation, i.moves), ("hv0", 1, 0));
        check_boot_params(name, &i.bytes());
        assert!(rip_in_image(r.rip), "{name}: rip {:#x}", r.rip);
        assert_eq!(r.cr3, vmbeam_abi::l2::PML4);
        assert_eq!(r.cs, 0x8);
    }
    let st = vmm.status();
    assert_eq!(st.policy, "manual");
    assert!(st.host_vms[0].retired.is_empty());
    assert!(st.host_vms[0]
        .nested
        .iter()
        .all(|n| n.host_vm == "hv0" && n.generation == 1 && n.moves == 0));

    // A monitor keeps inspecting l2-1 while it moves.
    let stop = Arc::new(AtomicBool::new(false));
    let inspected = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let monitor = {
        let (vmm, stop, inspected) = (vmm.clone(), stop.clone(), inspected.clone());
        std::thread::spawn(move || {
            let mut gens = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match vmm.inspect("l2-1", 0x1000, 24) {
                    Ok(i) => {
                        check_boot_params("l2-1", &i.bytes());
                        if gens.last() != Some(&i.generation) {
                            gens.push(i.generation);
                        }
                        inspected.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (gens, failures)
        })
    };
    // The monitor inspects a few times before the move and a few after.
    let seen = || inspected.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        "inspections before the move",
        || seen() >= 3,
    );
    let pages = common::moves::guest_pages(&vmm.current(None).unwrap(), false);
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    assert_eq!(r.to_generation, 2);
    common::moves::check_same_pages(&vmm.current(None).unwrap(), &pages);
    let moved_at = seen();
    wait_until(
        Duration::from_secs(30),
        "inspections after the move",
        || seen() >= moved_at + 3,
    );
    stop.store(true, Ordering::SeqCst);
    let (gens, failures) = monitor.join().unwrap();
    assert!(failures.is_empty(), "the monitor failed: {failures:?}");
    assert_eq!(gens, vec![1, 2]);

    // After the move.
    for name in ["l2-0", "l2-1"] {
        let (i, r) = regs_of(&vmm, name);
        assert_eq!((i.host_vm.as_str(), i.generation, i.moves), ("hv0", 2, 1));
        check_boot_params(name, &i.bytes());
        assert!(rip_in_image(r.rip), "{name}: rip {:#x}", r.rip);
    }
    let st = vmm.status();
    let vm = &st.host_vms[0];
    assert_eq!(vm.generation, 2);
    assert!(vm
        .nested
        .iter()
        .all(|n| n.host_vm == "hv0" && n.generation == 2 && n.moves == 1));
    assert_eq!(vm.retired.len(), 1);
    assert_eq!(vm.retired[0].generation, 1);
    assert_eq!(vm.retired[0].reason, "manual");
    assert_eq!(vm.retired[0].detail, None);
    assert!(vm.retired[0].health.contains_key("pool_free_bytes"));

    // The same through the API.
    let server = ApiServer::bind(&dir.join("api.sock")).unwrap();
    let call = |body: &str| server.route(&vmm, "POST", "/inspect", body);
    let (code, body) = call(r#"{"guest":"l2-0","gpa":"0x1000","len":32}"#);
    assert_eq!(code, 200, "{body}");
    let i: Inspection = serde_json::from_str(&body).unwrap();
    assert_eq!(i.generation, 2);
    check_boot_params("l2-0", &i.bytes());
    let (code, body) = call(r#"{"guest":"l2-0","gpa":4096,"len":65537}"#);
    assert_eq!(code, 400);
    assert!(body.contains("at most 65536 bytes (64 KiB)"), "{body}");
    let (code, body) = call(r#"{"guest":"l2-0","gpa":4096,"len":65536}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(r#"{"guest":"nope","gpa":4096,"len":8}"#);
    assert_eq!(code, 404);
    assert!(body.contains("no nested guest named 'nope'"), "{body}");
    let (code, body) = call(r#"{"guest":"l2-0","gpa":"0x100000000","len":8}"#);
    assert_eq!(code, 404);
    assert!(body.contains("not all mapped guest memory"), "{body}");
    let (code, body) = call(r#"{"guest":"l2-0","gpa":"0xZZ","len":8}"#);
    assert_eq!(code, 400);
    assert!(body.contains("invalid number '0xZZ'"), "{body}");
    let (code, body) = call(r#"{"guest":"l2-0","gpa":0,"len":8,"pause":true}"#);
    assert_eq!(code, 400);
    assert!(body.contains("bad inspect request"), "{body}");
    let (code, _) = server.route(&vmm, "GET", "/inspect", "");
    assert_eq!(code, 405);
    assert!(vmm.failure().is_none());
}

#[test]
fn policy_and_inspect_arguments_are_checked() {
    let parse = |args: &[&str]| Cli::try_parse_from(args).map_err(|e| e.to_string());
    let e = parse(&["vmbeam", "run", "--rejuvenate-when", "used>3"]).unwrap_err();
    assert!(e.contains("write free<PERCENT% or free<SIZE"), "{e}");
    let e = parse(&["vmbeam", "run", "--rejuvenate-when", "free<150%"]).unwrap_err();
    assert!(e.contains("above 0 and below 100"), "{e}");
    let e = parse(&["vmbeam", "run", "--rejuvenate-every", "5x"]).unwrap_err();
    assert!(e.contains("use a number with a unit ms, s, m or h"), "{e}");
    let e = parse(&["vmbeam", "inspect", "l2-0", "--read", "zz", "8"]).unwrap_err();
    assert!(e.contains("invalid number 'zz'"), "{e}");
    let e = parse(&["vmbeam", "inspect", "l2-0", "--read", "0x1000"]).unwrap_err();
    assert!(e.contains("--read"), "{e}");
    match parse(&[
        "vmbeam",
        "run",
        "--age-leak",
        "3",
        "--rejuvenate-when",
        "free<64M",
        "--rejuvenate-every",
        "5m",
        "--events",
        "/tmp/ev.jsonl",
    ])
    .unwrap()
    .command
    {
        Cmd::Run(r) => {
            assert_eq!(r.vm.age_leak, 3);
            assert_eq!(r.rejuvenate_every, Some(Duration::from_secs(300)));
            assert_eq!(r.events, Some(PathBuf::from("/tmp/ev.jsonl")));
            assert!(r.rejuvenate_when.is_some());
        }
        other => panic!("{other:?}"),
    }
    match parse(&["vmbeam", "inspect", "l2-1", "--read", "0x1000", "4096"])
        .unwrap()
        .command
    {
        Cmd::Inspect(i) => {
            assert_eq!(i.name, "l2-1");
            assert_eq!(i.range(), Ok((0x1000, 4096)));
        }
        other => panic!("{other:?}"),
    }

    // Checked before anything is booted or connected to.
    let run = |args: &[&str]| {
        let out = bin().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["run", "--rejuvenate-every", "500ms", "--duration", "1"]);
    assert!(e.contains("--rejuvenate-every 500ms is too short"), "{e}");
    let e = run(&["run", "--rejuvenate-when", "free<1G", "--duration", "1"]);
    assert!(e.contains("always holds with a 64 MiB nested pool"), "{e}");
    let e = run(&[
        "run",
        "--events",
        "/nonexistent-dir/events.jsonl",
        "--duration",
        "1",
    ]);
    assert!(e.contains("cannot open the events file"), "{e}");
    let e = run(&[
        "inspect",
        "l2-0",
        "--read",
        "0x1000",
        "70000",
        "--api-sock",
        "/nonexistent/vmbeam.sock",
    ]);
    assert!(e.contains("one inspect reads at most 65536 bytes"), "{e}");
}
