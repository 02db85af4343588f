//! What the command line offers besides its commands: `--mode` lists its
//! values in `--help`, sizes take `MiB`/`GiB`, shell completions and a man
//! page are generated from the same definition; and `vmbeam run
//! --log-file` writes a timestamped line for every API request, every
//! rejuvenation phase and every failure (real /dev/kvm).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use vmbeam::cli::{Cli, Command as Sub};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbeam"))
}

#[test]
fn help_completions_man_and_sizes() {
    let out = bin().args(["rejuvenate", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Possible values:"), "{help}");
    for v in ["- zero-copy: ", "- copy: ", "- precopy: "] {
        assert!(help.contains(v), "{v}: {help}");
    }
    let out = bin().args(["completions", "bash"]).output().unwrap();
    let bash = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(bash.contains("complete -F _vmbeam"), "{bash}");
    assert!(bash.contains("rejuvenate") && bash.contains("--api-sock"));
    let out = bin().args(["completions", "zsh"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("#compdef vmbeam"));
    let out = bin().arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.starts_with(".ie"), "{}", &man[..man.len().min(200)]);
    assert!(man.contains(".TH vmbeam"), "{man}");
    assert!(man.contains("rejuvenate"), "{man}");

    let cli = Cli::try_parse_from([
        "vmbeam",
        "run",
        "--mem",
        "32MiB",
        "--nested-mem",
        "1GiB",
        "--pool",
        "2G",
    ])
    .unwrap();
    let Sub::Run(a) = cli.command else {
        panic!("not run")
    };
    assert_eq!(
        (a.vm.mem, a.vm.nested_mem, a.vm.pool),
        (32 << 20, 1 << 30, Some(2 << 30))
    );
    let e = Cli::try_parse_from(["vmbeam", "run", "--mem", "32MiBs"]).unwrap_err();
    assert!(e.to_string().contains("invalid size '32MiBs'"), "{e}");
}

#[test]
fn the_log_file_has_a_line_per_request_phase_and_failure() {
    if !common::kvm_or_skip("the_log_file_has_a_line_per_request_phase_and_failure") {
        return;
    }
    let dir = common::temp_dir("cli-log");
    let sock = dir.join("api.sock");
    let log = dir.join("vmbeam.log");
    let mut child = bin()
        .args(["run", "--duration", "120", "--nested", "1", "--console-dir"])
        .arg(&dir)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--log-file")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        t.lines().count() >= 2
    });
    let call = |m: &str, p: &str, b: Option<&str>| vmbeam_vmm::api::call(&sock, m, p, b).unwrap();
    assert_eq!(call("GET", "/api/v1/status", None).0, 200);
    assert_eq!(call("POST", "/rejuvenate", Some("{}")).0, 200);
    assert_eq!(
        call("POST", "/rejuvenate", Some(r#"{"fault":"reject-first"}"#)).0,
        500
    );
    assert_eq!(call("DELETE", "/api/v1/status", None).0, 405);
    let out = bin()
        .args(["shutdown", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    let st = child.wait().unwrap();
    assert!(st.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.is_empty(), "the log went to stderr too: {stderr}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Every line starts with an RFC 3339 timestamp and a level.
    for l in &lines {
        let (ts, rest) = l.split_once(' ').unwrap();
        assert!(
            ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'),
            "{l}"
        );
        let level = rest.trim_start().split(' ').next().unwrap();
        assert!(["INFO", "WARN", "ERROR", "DEBUG"].contains(&level), "{l}");
    }
    let has = |what: &str| lines.iter().any(|l| l.contains(what));
    assert!(
        has("host VM hv0/g1 booted") || has("host VM hv0 booted"),
        "{text}"
    );
    assert!(
        has("API request method=GET path=/api/v1/status code=200"),
        "{text}"
    );
    assert!(
        has("API request method=POST path=/rejuvenate code=200"),
        "{text}"
    );
    assert!(
        has("API request failed method=DELETE path=/api/v1/status code=405"),
        "{text}"
    );
    for phase in ["booting", "handing_over", "committed", "rolled_back"] {
        assert!(
            has(&format!("rejuvenation phase: {phase}")),
            "{phase}: {text}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("rolled back")),
        "no ERROR line for the failed rejuvenation: {text}"
    );
    assert!(has("shutdown requested through the API"), "{text}");
}
