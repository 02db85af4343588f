//! Long operations as jobs, on real /dev/kvm: a rejuvenation started through
//! `/api/v1/rejuvenate` reports its progress, shows in `status`, and a
//! `DELETE` rolls it back; a migration to a slow destination is followed
//! and cancelled with the source still running; the CLI follows a job with
//! progress lines and, on Ctrl-C without a terminal, detaches and says how
//! to cancel; `vmbeam shutdown` returns once the server is gone, so `run`
//! on the same socket works at once; SIGINT during a rejuvenation rolls it
//! back and removes the socket.

mod common;

use common::server::{call, Run};

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmbeam_vmm::api;
use vmbeam_vmm::base::progress::Phase;
use vmbeam_vmm::control::jobs::JobView;
use vmbeam_vmm::vmm::Status;

fn start(dir: &Path, sock: &Path, extra: &[&str]) -> Run {
    common::server::start_run(dir, sock, extra, 1)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbeam"))
}

fn job(sock: &Path, id: u64) -> JobView {
    let (code, body) = call(sock, "GET", &format!("/api/v1/jobs/{id}"), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn status(sock: &Path) -> Status {
    serde_json::from_str(&call(sock, "GET", "/api/v1/status", None).1).unwrap()
}

/// Polls job `id` (which may not exist yet) until `pred` holds (60 s at most).
fn wait_job(sock: &Path, id: u64, what: &str, pred: impl Fn(&JobView) -> bool) -> JobView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = call(sock, "GET", &format!("/api/v1/jobs/{id}"), None);
        if code == 200 {
            let j: JobView = serde_json::from_str(&body).unwrap();
            if pred(&j) {
                return j;
            }
        }
        assert!(Instant::now() < deadline, "{what}: job is {code} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_job(sock: &Path, path: &str, body: &str) -> JobView {
    let r = api::request(sock, "POST", path, Some(body)).unwrap();
    assert_eq!(r.code, 202, "{}", r.body);
    let j: JobView = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        r.header("location"),
        Some(format!("/api/v1/jobs/{}", j.id).as_str())
    );
    j
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rejuvenation_job_reports_progress_and_a_cancel_rolls_it_back() {
    if !common::kvm_or_skip("a_rejuvenation_job_reports_progress_and_a_cancel_rolls_it_back") {
        return;
    }
    let dir = common::temp_dir("jobs-cancel");
    let sock = dir.join("api.sock");
    let _run = start(&dir, &sock, &["--nested", "2"]);

    // A successor that never becomes ready holds the job in `booting`.
    let j = start_job(
        &sock,
        "/api/v1/rejuvenate",
        r#"{"fault":"hang-at-boot","timeout_secs":120}"#,
    );
    let running = wait_job(&sock, j.id, "booting", |j| {
        j.progress.phase == Phase::Booting
    });
    assert_eq!(running.progress.guests_total, 2);
    // It shows in the status, and a second operation is refused meanwhile.
    let st = status(&sock);
    assert_eq!(st.jobs.len(), 1, "{st:?}");
    assert_eq!(st.jobs[0].id, j.id);
    let out = bin()
        .args(["status", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("running: job {} (rejuvenate hv0): booting", j.id)),
        "{text}"
    );
    let (code, body) = call(&sock, "POST", "/api/v1/rejuvenate", Some("{}"));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already running"), "{body}");
    // Cancel: answered at once, then the rollback.
    let (code, body) = call(&sock, "DELETE", &format!("/api/v1/jobs/{}", j.id), None);
    assert_eq!(code, 200, "{body}");
    let v: JobView = serde_json::from_str(&body).unwrap();
    assert!(v.progress.cancel_requested);
    let done = wait_job(&sock, j.id, "cancelled", |j| j.progress.phase.is_final());
    assert_eq!(done.progress.phase, Phase::Cancelled, "{done:?}");
    let err = done.error.unwrap();
    assert!(err.contains("cancelled on request"), "{err}");
    assert!(
        err.contains("rolled back: all 2 nested guests keep running under generation 1"),
        "{err}"
    );
    assert!(done.report.is_none());
    // The state before it: generation 1, both guests running and progressing.
    let st = status(&sock);
    assert!(st.jobs.is_empty(), "{st:?}");
    assert_eq!(st.host_vms[0].generation, 1);
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), 2);
    for g in ["l2-0", "l2-1"] {
        let before = common::console(&dir, g).lines().count();
        common::wait_console(&dir, g, Duration::from_secs(60), |t| {
            t.lines().count() > before
        });
    }

    // A pre-copy job that runs to its end reports bytes, rounds and guests.
    let j = start_job(&sock, "/api/v1/rejuvenate", r#"{"mode":"precopy"}"#);
    let done = wait_job(&sock, j.id, "precopy done", |j| j.progress.phase.is_final());
    assert_eq!(done.progress.phase, Phase::Done, "{done:?}");
    let r = done.report.unwrap();
    assert_eq!((r.from_generation, r.to_generation), (1, 2));
    let p = done.progress;
    assert!(p.rounds >= 2, "{p:?}");
    assert!(p.bytes_done > 0 && p.bytes_total >= p.bytes_done, "{p:?}");
    assert_eq!((p.guests_done, p.guests_total), (2, 2));
    assert_eq!(
        r.precopy.unwrap().rounds as u64,
        p.rounds,
        "progress counts the report's rounds"
    );
    // Every job is listed.
    let (_, body) = call(&sock, "GET", "/api/v1/jobs", None);
    let all: Vec<JobView> = serde_json::from_str(&body).unwrap();
    assert_eq!(all.len(), 2, "{body}");
    let _ = call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}

#[test]
fn a_migration_job_is_followed_and_cancelled_with_the_source_running() {
    if !common::kvm_or_skip("a_migration_job_is_followed_and_cancelled_with_the_source_running") {
        return;
    }
    let dir = common::temp_dir("jobs-migrate");
    let sock = dir.join("api.sock");
    let _run = start(&dir, &sock, &["--nested", "1"]);
    // A destination that reads slowly (about 1 MB/s) and never answers.
    let dest = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dest.local_addr().unwrap().port();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = dest.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16 << 10];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
            std::thread::sleep(Duration::from_millis(15));
        }
        total
    });
    let j = start_job(
        &sock,
        "/api/v1/migrate",
        &format!(r#"{{"to":"tcp://127.0.0.1:{port}"}}"#),
    );
    let moving = wait_job(&sock, j.id, "bytes moving", |j| j.progress.bytes_done > 0);
    assert_eq!(moving.progress.phase, Phase::Precopy, "{moving:?}");
    assert!(moving.progress.bytes_total > moving.progress.bytes_done);
    let (code, _) = call(&sock, "DELETE", &format!("/api/v1/jobs/{}", j.id), None);
    assert_eq!(code, 200);
    let done = wait_job(&sock, j.id, "cancelled", |j| j.progress.phase.is_final());
    assert_eq!(done.progress.phase, Phase::Cancelled, "{done:?}");
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("the migration was cancelled; the source keeps running"),
        "{done:?}"
    );
    // The source keeps the VM and runs it.
    let st = status(&sock);
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].status, "running");
    let before = common::console(&dir, "l2-0").lines().count();
    common::wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        t.lines().count() > before
    });
    // The stream was closed: the slow reader ends.
    let got = reader.join().unwrap();
    assert!(got > 0);
    // A name that does not resolve is reported as such, before any job.
    let (code, body) = call(
        &sock,
        "POST",
        "/api/v1/migrate",
        Some(r#"{"to":"tcp://no-such-host.invalid:7411"}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("cannot resolve the destination host 'no-such-host.invalid'"),
        "{body}"
    );
    let _ = call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}

#[test]
fn the_cli_follows_a_job_and_detaches_on_ctrl_c_without_a_terminal() {
    if !common::kvm_or_skip("the_cli_follows_a_job_and_detaches_on_ctrl_c_without_a_terminal") {
        return;
    }
    let dir = common::temp_dir("jobs-cli");
    let sock = dir.join("api.sock");
    let _run = start(&dir, &sock, &["--nested", "1"]);
    // Followed to the end: plain progress lines on stderr, report on stdout.
    let out = bin()
        .args(["rejuvenate", "--mode", "precopy", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("vmbeam: job 1 (rejuvenate hv0): "), "{err}");
    assert!(err.contains(": done, "), "{err}");
    assert!(
        text.contains("rejuvenated hv0: generation 1 -> 2 (precopy)"),
        "{text}"
    );
    assert!(text.contains("pre-copy"), "{text}");
    assert!(text.contains(" round(s)"), "{text}");

    // Ctrl-C with no terminal to ask on: detach, say how to cancel; the job
    // goes on.
    let mut client = bin()
        .args(["rejuvenate", "--fault", "hang-at-boot", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_job(&sock, 2, "booting", |j| j.progress.phase == Phase::Booting);
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    let st = wait_exit(&mut client, 30);
    let mut err = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{err}");
    assert!(err.contains("vmbeam: detached: job 2 goes on"), "{err}");
    assert!(err.contains("`vmbeam cancel 2 --api-sock"), "{err}");
    assert!(!job(&sock, 2).progress.phase.is_final());
    // `vmbeam cancel` rolls it back and waits for that.
    let out = bin()
        .args(["cancel", "2", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("job 2 cancelled: "), "{text}");
    assert!(text.contains("cancelled on request"), "{text}");
    assert!(text.contains("rolled back"), "{text}");
    assert_eq!(job(&sock, 2).progress.phase, Phase::Cancelled);
    // `vmbeam jobs` lists both.
    let out = bin()
        .args(["jobs", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("job 1 (rejuvenate hv0): done"), "{text}");
    assert!(text.contains("job 2 (rejuvenate hv0): cancelled"), "{text}");
    let _ = call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}

#[test]
fn shutdown_returns_once_the_server_is_gone_and_sigint_rolls_back_first() {
    if !common::kvm_or_skip("shutdown_returns_once_the_server_is_gone_and_sigint_rolls_back_first")
    {
        return;
    }
    let dir = common::temp_dir("jobs-shutdown");
    let sock = dir.join("api.sock");
    let mut run = start(&dir, &sock, &["--nested", "1"]);
    let pid = run.0.id();
    let out = bin()
        .args(["shutdown", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Returned only after the socket went and the process ended (it may
    // wait as a zombie for this test to collect it).
    assert!(
        !sock.exists(),
        "shutdown returned with the socket still there"
    );
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.rsplit_once(") ").unwrap().1.starts_with('Z'),
        "vmbeam run still runs: {state}"
    );
    assert!(wait_exit(&mut run.0, 5).success());

    // `run` on the same socket at once.
    let events = dir.join("events.jsonl");
    let dir2 = dir.join("second");
    let mut run = start(
        &dir2,
        &sock,
        &["--nested", "1", "--events", events.to_str().unwrap()],
    );
    assert_eq!(call(&sock, "GET", "/api/v1/vmm.ping", None).0, 200);
    // SIGINT while a rejuvenation runs: it is rolled back, then the socket
    // goes and the process exits cleanly.
    let j = start_job(&sock, "/api/v1/rejuvenate", r#"{"fault":"hang-at-boot"}"#);
    wait_job(&sock, j.id, "booting", |j| {
        j.progress.phase == Phase::Booting
    });
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(run.0.id() as i32, libc::SIGINT) };
    let st = wait_exit(&mut run.0, 60);
    assert!(st.success());
    assert!(!sock.exists(), "the socket stays after SIGINT");
    let ev = std::fs::read_to_string(&events).unwrap();
    let failed = ev
        .lines()
        .find(|l| l.contains("\"rejuvenate_failed\""))
        .unwrap_or_else(|| panic!("no rejuvenate_failed event: {ev}"));
    assert!(failed.contains("cancelled on request"), "{failed}");
    assert!(failed.contains("rolled back"), "{failed}");
}
