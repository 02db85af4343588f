//! The command line: parsing errors, and `vmbeam run` / `status` /
//! `rejuvenate` / `shutdown` driving a real VMM through the API socket.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use vmbeam::cli::{Cli, Command as Cmd};

fn parse(args: &[&str]) -> Result<Cli, String> {
    Cli::try_parse_from(args).map_err(|e| e.to_string())
}

#[test]
fn cli_parsing_errors_are_clear() {
    let e = parse(&["vmbeam", "run", "--nested-mem", "12Q"]).unwrap_err();
    assert!(e.contains("invalid size '12Q'"), "{e}");
    let e = parse(&["vmbeam", "run", "--workload", "memtouch,bogus"]).unwrap_err();
    assert!(e.contains("unknown workload 'bogus'"), "{e}");
    let e = parse(&["vmbeam", "rejuvenate", "--mode", "teleport"]).unwrap_err();
    assert!(e.contains("invalid value 'teleport'"), "{e}");
    assert!(
        e.contains("possible values: zero-copy, copy, precopy"),
        "{e}"
    );
    let e = parse(&["vmbeam", "run", "--vcpus", "many"]).unwrap_err();
    assert!(e.contains("--vcpus"), "{e}");
    assert!(parse(&["vmbeam", "frobnicate"]).is_err());
    let ok = parse(&[
        "vmbeam",
        "run",
        "--nested",
        "3",
        "--nested-mem",
        "64M",
        "--workload",
        "ticker",
    ])
    .unwrap();
    match ok.command {
        Cmd::Run(r) => {
            assert_eq!(r.vm.nested, 3);
            assert_eq!(r.vm.nested_mem, 64 << 20);
            assert_eq!(r.vm.workload.len(), 1);
        }
        other => panic!("{other:?}"),
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbeam"))
}

/// Starts `vmbeam run` (consoles in `dir`, API on `sock`, at most 120 s)
/// with `extra` options; its own output is discarded.
fn run_server(
    dir: &std::path::Path,
    sock: &std::path::Path,
    extra: &[&str],
) -> std::process::Child {
    bin()
        .args(["run", "--duration", "120"])
        .args(extra)
        .arg("--console-dir")
        .arg(dir)
        .arg("--api-sock")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn bad_values_fail_with_one_clear_sentence() {
    if !common::kvm_or_skip("bad_values_fail_with_one_clear_sentence") {
        return;
    }
    let out = bin()
        .args([
            "run",
            "--nested",
            "4",
            "--nested-mem",
            "64M",
            "--pool",
            "64M",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not fit a 64 MiB pool"), "{err}");
    let out = bin()
        .args(["status", "--api-sock", "/nonexistent/vmbeam.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the vmbeam API at /nonexistent/vmbeam.sock"),
        "{err}"
    );
}

#[test]
fn run_status_rejuvenate_shutdown_through_the_api() {
    if !common::kvm_or_skip("run_status_rejuvenate_shutdown_through_the_api") {
        return;
    }
    let dir = common::temp_dir("cli-api");
    let sock = dir.join("api.sock");
    let mut child = run_server(&dir, &sock, &[]);
    common::wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        t.lines().count() >= 3
    });
    let mode = std::fs::metadata(&sock).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o600, "API socket must be owner-only");

    let out = bin()
        .args(["status", "--json", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["host_vms"][0]["generation"], 1);
    assert_eq!(st["host_vms"][0]["nested"].as_array().unwrap().len(), 2);

    let out = bin()
        .args(["rejuvenate", "--json", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "mode",
        "boot_ms",
        "handover_ms",
        "total_ms",
        "bytes_copied",
        "channel_bytes",
        "released_bytes",
        "host_rss_before",
        "host_rss_after",
        "guests",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r}");
    }
    for g in r["guests"].as_array().unwrap() {
        for key in [
            "name",
            "mem_bytes",
            "downtime_us",
            "checksum_before",
            "checksum_after",
            "running_after",
        ] {
            assert!(g.get(key).is_some(), "guest report lacks {key}: {g}");
        }
        assert_eq!(g["running_after"], true);
    }

    let out = bin()
        .args(["status", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("host VM hv0 (generation 2"), "{text}");

    let out = bin()
        .args(["rejuvenate", "--vm", "nope", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host VM named 'nope'"));

    // Malformed API requests get a clear error and change nothing.
    let (code, body) =
        vmbeam_vmm::api::call(&sock, "POST", "/rejuvenate", Some("{\"mode\": 7}")).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bad rejuvenate request"), "{body}");
    let (code, _) = vmbeam_vmm::api::call(&sock, "GET", "/nowhere", None).unwrap();
    assert_eq!(code, 404);

    let out = bin()
        .args(["shutdown", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "vmbeam run did not exit after shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(!sock.exists(), "the API socket is removed on exit");
}

#[test]
fn the_api_answers_while_a_rejuvenation_runs() {
    if !common::kvm_or_skip("the_api_answers_while_a_rejuvenation_runs") {
        return;
    }
    let dir = common::temp_dir("cli-concurrent");
    let sock = dir.join("api.sock");
    let mut child = run_server(&dir, &sock, &["--nested", "1"]);
    common::wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        t.lines().count() >= 2
    });
    // A rejuvenation whose successor never becomes ready holds for ~3 s.
    // (If it ends before the probe sees it, e.g. on a loaded machine, the
    // scenario is set up again; the check itself is the 409 below.)
    let mut seen = None;
    let mut early = Vec::new();
    for _attempt in 0..3 {
        let s2 = sock.clone();
        let slow = std::thread::spawn(move || {
            vmbeam_vmm::api::call(
                &s2,
                "POST",
                "/rejuvenate",
                Some(r#"{"fault":"hang-at-boot","timeout_secs":3}"#),
            )
            .unwrap()
        });
        // Probe with a request that changes nothing when it gets through (an
        // unknown host VM, 404) until the running rejuvenation makes it 409.
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = loop {
            let (code, body) =
                vmbeam_vmm::api::call(&sock, "POST", "/rejuvenate", Some(r#"{"vm":"nope"}"#))
                    .unwrap();
            if code != 404 || Instant::now() > deadline || slow.is_finished() {
                break (code, body);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if probe.0 == 409 {
            seen = Some((probe, slow));
            break;
        }
        early.push(slow.join().unwrap());
    }
    let Some(((code, body), slow)) = seen else {
        panic!("never saw a rejuvenation in progress; the slow ones ended with {early:?}");
    };
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already running"), "{body}");
    let (code, body) = vmbeam_vmm::api::call(&sock, "GET", "/status", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = slow.join().unwrap();
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("rolled back"), "{body}");
    let _ = bin().args(["shutdown", "--api-sock"]).arg(&sock).output();
    let _ = child.wait();
}

#[test]
fn an_interrupted_rejuvenate_client_loses_no_guest() {
    if !common::kvm_or_skip("an_interrupted_rejuvenate_client_loses_no_guest") {
        return;
    }
    let dir = common::temp_dir("cli-interrupt");
    let sock = dir.join("api.sock");
    let mut server = run_server(&dir, &sock, &[]);
    common::wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        t.lines().count() >= 2
    });
    for delay_ms in [0u64, 5, 30] {
        let mut client = bin()
            .args(["rejuvenate", "--api-sock"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = client.kill();
        let _ = client.wait();
        // Whatever the server was doing finishes on its own: wait until it is
        // idle (a probe that changes nothing stops answering 409).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, _) =
                vmbeam_vmm::api::call(&sock, "POST", "/rejuvenate", Some(r#"{"vm":"nope"}"#))
                    .unwrap();
            if code == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "the server stayed busy");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every guest runs under exactly one guest hypervisor, the current one.
        let (code, body) = vmbeam_vmm::api::call(&sock, "GET", "/status", None).unwrap();
        assert_eq!(code, 200);
        let st: serde_json::Value = serde_json::from_str(&body).unwrap();
        let vms = st["host_vms"].as_array().unwrap();
        assert_eq!(vms.len(), 1, "{body}");
        assert_eq!(vms[0]["status"], "running", "{body}");
        let nested = vms[0]["nested"].as_array().unwrap();
        assert_eq!(nested.len(), 2, "{body}");
        let before = common::console(&dir, "l2-1").lines().count();
        common::wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
            t.lines().count() > before
        });
    }
    let _ = bin().args(["shutdown", "--api-sock"]).arg(&sock).output();
    let status = server.wait().unwrap();
    assert!(status.success());
}
