//! `GET /api/v1/metrics` on real /dev/kvm, read by a real Prometheus text
//! parser (Python prometheus_client): after one
//! rejuvenation that succeeds and one that is rolled back, the counters,
//! the downtime histogram and the per-host-VM series say so.
//!
//! Without python3 at all the test prints SKIP (unless VMBEAM_REQUIRE_KVM=1);
//! a python3 without prometheus_client gets the pinned package in a virtual
//! environment of the tests' own, and if that cannot be installed the test
//! fails naming the command to run.

mod common;

use common::server::Run;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmbeam_vmm::api;

/// The parser: every sample as `name{labels} value`, one JSON list.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// The pinned parser, installed into a virtual environment of the tests'
/// own when the interpreter has no prometheus_client.
const PARSER_PACKAGE: &str = "prometheus-client==0.26.0";

fn start(dir: &Path, sock: &Path) -> Run {
    common::server::start_run(dir, sock, &["--nested", "2"], 2)
}

fn has_parser(py: &str) -> bool {
    Command::new(py)
        .args(["-c", "import prometheus_client.parser"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A python3 with prometheus_client: `VMBEAM_PYTHON`, else `python3` if it
/// has the package, else a virtual environment under cargo's target tmpdir
/// with the pinned package (so `cargo test --workspace` needs nothing set
/// up by hand). `None` only when there is no python3 at all.
fn python() -> Option<String> {
    let py = std::env::var("VMBEAM_PYTHON").unwrap_or_else(|_| "python3".into());
    let works = Command::new(&py)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        return None;
    }
    if has_parser(&py) {
        return Some(py);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics-venv");
    let venv_py = venv.join("bin/python");
    let venv_py_s = venv_py.to_string_lossy().into_owned();
    if venv_py.exists() && has_parser(&venv_py_s) {
        return Some(venv_py_s);
    }
    let created = Command::new(&py)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = created
        && Command::new(&venv_py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(PARSER_PACKAGE)
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        installed && has_parser(&venv_py_s),
        "the metrics check needs Python's prometheus_client and could not install it into {} \
         (offline?); run `{py} -m pip install {PARSER_PACKAGE}` or set VMBEAM_PYTHON to a \
         python3 that has it",
        venv.display()
    );
    Some(venv_py_s)
}

fn parse(py: &str, text: &str) -> Vec<serde_json::Value> {
    let mut child = Command::new(py)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    if !common::kvm_or_skip("metrics_parse_as_prometheus_text_and_count_what_happened") {
        return;
    }
    let Some(py) = python() else {
        assert!(
            std::env::var("VMBEAM_REQUIRE_KVM").as_deref() != Ok("1"),
            "python3 is required for the metrics parser check"
        );
        println!("SKIP metrics_parse_as_prometheus_text_and_count_what_happened: no python3");
        return;
    };
    let dir = common::temp_dir("metrics");
    let sock = dir.join("api.sock");
    let _run = start(&dir, &sock);

    let r = api::request(&sock, "GET", "/api/v1/metrics", None).unwrap();
    assert_eq!(r.code, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let before = parse(&py, &r.body);
    assert_eq!(
        value(&before, "vmbeam_rejuvenations_total", &[("result", "ok")]),
        0.0
    );

    // One that works (copy mode: bytes are copied), one rolled back.
    let (code, body) = api::call(&sock, "POST", "/rejuvenate", Some(r#"{"mode":"copy"}"#)).unwrap();
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (code, body) = api::call(
        &sock,
        "POST",
        "/rejuvenate",
        Some(r#"{"fault":"reject-first"}"#),
    )
    .unwrap();
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("rolled back"), "{body}");

    let (_, text) = api::call(&sock, "GET", "/api/v1/metrics", None).unwrap();
    let m = parse(&py, &text);
    let v = |name: &str, labels: &[(&str, &str)]| value(&m, name, labels);
    assert_eq!(v("vmbeam_rejuvenations_total", &[("result", "ok")]), 1.0);
    assert_eq!(
        v("vmbeam_rejuvenations_total", &[("result", "failed")]),
        1.0
    );
    assert_eq!(v("vmbeam_rollbacks_total", &[]), 1.0);
    assert_eq!(
        v("vmbeam_copied_bytes_total", &[]),
        report["bytes_copied"].as_f64().unwrap()
    );
    assert!(v("vmbeam_copied_bytes_total", &[]) > 0.0);
    // The histogram holds the two guests of the successful one.
    assert_eq!(v("vmbeam_guest_downtime_seconds_count", &[]), 2.0);
    assert_eq!(
        v("vmbeam_guest_downtime_seconds_bucket", &[("le", "+Inf")]),
        2.0
    );
    let sum: f64 = report["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["downtime_us"].as_f64().unwrap() / 1e6)
        .sum();
    assert!((v("vmbeam_guest_downtime_seconds_sum", &[]) - sum).abs() < 1e-6);
    let fam = m
        .iter()
        .find(|s| s["name"] == "vmbeam_guest_downtime_seconds_count")
        .unwrap();
    assert_eq!(fam["type"], "histogram");
    // Per host VM: generation 2 now, its hypercalls and nested exits, L1 health.
    assert_eq!(v("vmbeam_host_vm_generation", &[("vm", "hv0")]), 2.0);
    assert_eq!(v("vmbeam_host_vm_running", &[("vm", "hv0")]), 1.0);
    assert!(
        v(
            "vmbeam_hypercalls_total",
            &[("vm", "hv0"), ("generation", "2")]
        ) > 0.0
    );
    v(
        "vmbeam_nested_exits_total",
        &[("vm", "hv0"), ("generation", "2")],
    );
    assert_eq!(v("vmbeam_nested_guests", &[("vm", "hv0")]), 2.0);
    // The successor reports health within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = api::call(&sock, "GET", "/api/v1/metrics", None).unwrap();
        let m = parse(&py, &text);
        if m.iter()
            .any(|s| s["name"] == "vmbeam_l1_health" && s["labels"]["field"] == "pool_free_bytes")
        {
            assert!(
                value(
                    &m,
                    "vmbeam_l1_health",
                    &[("vm", "hv0"), ("field", "nested_guests")]
                ) == 2.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no L1 health in {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = api::call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}
