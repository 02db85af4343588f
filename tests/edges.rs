//! Bad input at the edges of vmbeam: the API socket and the client. Each
//! bad request must get one clear error and change nothing: the host VM and
//! its nested guests keep running and the status tree stays as it was.
//! (`tests/cli.rs` already covers bad command-line values, a malformed
//! `mode`, an unknown path and `--vm nope` through the CLI.)

mod common;

use common::server::{call, Run};

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_vmm::api::{self, ApiError};
use vmbeam_vmm::vmm::Status;

fn start_run(dir: &Path, sock: &Path) -> Run {
    common::server::start_run(dir, sock, &[], 2)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbeam"))
}

/// Sends `bytes` as they are, closes the write side, returns the answer.
fn raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    // The server may answer and close before it read everything we send.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

fn status(sock: &Path) -> Status {
    let (code, body) = call(sock, "GET", "/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A nested guest as `shape` sees it: name, handle, moves, state.
type GuestShape = (String, u32, u32, String);

/// What must not change: which host VMs and nested guests exist, where
/// they run, and that they are running.
fn shape(s: &Status) -> Vec<(String, u32, String, Vec<GuestShape>)> {
    s.host_vms
        .iter()
        .map(|h| {
            let mut nested: Vec<_> = h
                .nested
                .iter()
                .map(|n| (n.name.clone(), n.handle, n.moves, n.state.clone()))
                .collect();
            nested.sort();
            (h.name.clone(), h.generation, h.status.clone(), nested)
        })
        .collect()
}

fn console_lines(s: &Status) -> Vec<u64> {
    s.host_vms[0]
        .nested
        .iter()
        .map(|n| n.console_lines)
        .collect()
}

/// Asserts a JSON error answer: `code`, and an `error` message containing `want`.
fn expect_error(what: &str, (code, body): (u16, String), want_code: u16, want: &str) {
    assert_eq!(code, want_code, "{what}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: body {body:?}: {e}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    assert!(msg.contains(want), "{what}: error {msg:?} lacks {want:?}");
    assert!(!msg.contains('\n'), "{what}: one line, got {msg:?}");
}

#[test]
fn bad_api_requests_get_one_clear_error_and_change_nothing() {
    if !common::kvm_or_skip("bad_api_requests_get_one_clear_error_and_change_nothing") {
        return;
    }
    let dir = common::temp_dir("edges-api");
    let sock = dir.join("api.sock");
    let mut run = start_run(&dir, &sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket must be owner-only");
    let before = status(&sock);
    assert_eq!(before.host_vms.len(), 1);
    assert_eq!(before.host_vms[0].nested.len(), 2);

    let post = |path: &str, body: &str| call(&sock, "POST", path, Some(body));
    // Wrong JSON, wrong types, unknown fields.
    let bad_json = "bad rejuvenate request";
    expect_error(
        "truncated JSON",
        post("/rejuvenate", "{\"vm\":"),
        400,
        bad_json,
    );
    expect_error(
        "not JSON",
        post("/rejuvenate", "rejuvenate please"),
        400,
        bad_json,
    );
    expect_error("JSON array", post("/rejuvenate", "[1,2]"), 400, bad_json);
    expect_error(
        "wrong type",
        post("/rejuvenate", r#"{"verify":"yes"}"#),
        400,
        bad_json,
    );
    expect_error(
        "negative timeout",
        post("/rejuvenate", r#"{"timeout_secs":-1}"#),
        400,
        bad_json,
    );
    expect_error(
        "unknown field",
        post("/rejuvenate", r#"{"vm":"hv0","bogus":1}"#),
        400,
        "unknown field `bogus`",
    );
    expect_error(
        "unknown mode",
        post("/rejuvenate", r#"{"mode":"teleport"}"#),
        400,
        "unknown variant `teleport`",
    );
    expect_error(
        "unknown fault",
        post("/rejuvenate", r#"{"fault":"meteor"}"#),
        400,
        "unknown fault 'meteor'",
    );
    expect_error(
        "checksum unknown field",
        post("/checksum", r#"{"guest":"l2-0","gpa":0,"len":8,"x":1}"#),
        400,
        "unknown field `x`",
    );
    expect_error(
        "checksum missing field",
        post("/checksum", r#"{"guest":"l2-0"}"#),
        400,
        "bad checksum request",
    );
    expect_error(
        "checksum empty body",
        post("/checksum", ""),
        400,
        "bad checksum request",
    );
    // Unknown names.
    expect_error(
        "unknown host VM",
        post("/rejuvenate", r#"{"vm":"nope"}"#),
        404,
        "no host VM named 'nope'",
    );
    expect_error(
        "unknown guest",
        post("/checksum", r#"{"guest":"nope","gpa":0,"len":8}"#),
        404,
        "no nested guest named 'nope'",
    );
    expect_error(
        "host VM name with control characters",
        post("/rejuvenate", r#"{"vm":"hv0\n\u0000x"}"#),
        404,
        "no host VM named",
    );
    expect_error(
        "unmapped checksum range",
        post(
            "/checksum",
            r#"{"guest":"l2-0","gpa":4611686018427387904,"len":8}"#,
        ),
        404,
        "cannot inspect l2-0",
    );
    expect_error(
        "wrapping checksum range",
        post(
            "/checksum",
            r#"{"guest":"l2-0","gpa":18446744073709551608,"len":16}"#,
        ),
        400,
        "above the int64 maximum",
    );
    expect_error(
        "misaligned checksum range",
        post("/checksum", r#"{"guest":"l2-0","gpa":3,"len":8}"#),
        400,
        "cannot inspect l2-0",
    );
    // Wrong methods: refused, and none of them acts (GET /shutdown must
    // not stop anything, DELETE /rejuvenate must not rejuvenate).
    for (m, p) in [
        ("DELETE", "/status"),
        ("POST", "/status"),
        ("GET", "/rejuvenate"),
        ("PUT", "/rejuvenate"),
        ("GET", "/checksum"),
        ("GET", "/shutdown"),
        ("POST", "/shutdown"),
        ("DELETE", "/shutdown"),
    ] {
        expect_error(
            &format!("{m} {p}"),
            call(&sock, m, p, None),
            405,
            &format!("method {m} not allowed on {p}"),
        );
    }
    expect_error(
        "lower-case method",
        call(&sock, "get", "/status", None),
        405,
        "not allowed",
    );
    expect_error(
        "unknown path",
        call(&sock, "GET", "/status/x", None),
        404,
        "no such endpoint",
    );

    // Malformed HTTP.
    let req = |head: &str| format!("{head}\r\nHost: x\r\n\r\n");
    expect_error(
        "oversized Content-Length",
        raw(
            &sock,
            b"POST /rejuvenate HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n{}",
        ),
        400,
        "too large",
    );
    expect_error(
        "Content-Length beyond u64",
        raw(
            &sock,
            b"POST /rejuvenate HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
        ),
        400,
        "bad Content-Length",
    );
    expect_error(
        "negative Content-Length",
        raw(
            &sock,
            b"POST /rejuvenate HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        ),
        400,
        "bad Content-Length",
    );
    expect_error(
        "body shorter than Content-Length",
        raw(
            &sock,
            b"POST /rejuvenate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
        ),
        400,
        "the body ended before its Content-Length of 100 bytes",
    );
    expect_error(
        "non-UTF-8 body",
        raw(
            &sock,
            b"POST /checksum HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe",
        ),
        400,
        "body is not UTF-8",
    );
    expect_error(
        "chunked body",
        raw(
            &sock,
            b"POST /rejuvenate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ),
        400,
        "Transfer-Encoding is not supported",
    );
    expect_error("empty request", raw(&sock, b""), 400, "empty request");
    expect_error(
        "no path",
        raw(&sock, req("GET").as_bytes()),
        400,
        "the request line has no path",
    );
    expect_error(
        "no HTTP version",
        raw(&sock, req("GET /status").as_bytes()),
        400,
        "must end in HTTP/1.0 or HTTP/1.1",
    );
    expect_error(
        "headers never end",
        raw(&sock, b"GET /status HTTP/1.1\r\nHost: x\r\n"),
        400,
        "before the end of the request head",
    );
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    expect_error(
        "100 kB request line",
        raw(&sock, &long),
        400,
        "request head longer than",
    );
    let mut many = b"GET /status HTTP/1.1\r\n".to_vec();
    for i in 0..1000 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    expect_error("1000 headers", raw(&sock, &many), 400, "header lines");
    expect_error(
        "binary garbage",
        raw(&sock, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n"),
        400,
        "invalid request head",
    );

    // Clients that go away: before sending anything, in the middle of the
    // headers, in the middle of the body, before reading the answer.
    drop(UnixStream::connect(&sock).unwrap());
    for partial in [
        &b"POST /rejuvenate HTT"[..],
        b"POST /rejuvenate HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vm\":",
        b"PUT /shutdown HTTP/1.1\r\nContent-Length: 0\r\n",
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(partial).unwrap();
        drop(s);
        assert_eq!(call(&sock, "GET", "/status", None).0, 200);
    }
    for _ in 0..5 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
        drop(s);
    }
    assert_eq!(call(&sock, "GET", "/status", None).0, 200);

    // A client that trickles its request gets cut off at the server's
    // deadline instead of holding the API; others are served meanwhile.
    let trickle_sock = sock.clone();
    let trickled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = trickled.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&trickle_sock).unwrap();
        let mut sent = 0;
        for b in b"GET /status HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'z'; 60].iter())
        {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            progress.store(sent, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(250));
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (sent, out)
    });
    // Served while the trickler is part-way through its request.
    common::wait_until(Duration::from_secs(30), "the trickler under way", || {
        trickled.load(std::sync::atomic::Ordering::SeqCst) >= 2
    });
    assert_eq!(call(&sock, "GET", "/status", None).0, 200);
    let (sent, out) = trickler.join().unwrap();
    expect_error(
        &format!("trickling client (sent {sent} bytes)"),
        parse_response(&out),
        400,
        "was not complete within",
    );

    // A flood of connections that send nothing: at most MAX_CONNECTIONS are
    // served (each cut off at the deadline), the others are answered 503 at
    // once; then the API serves as before.
    let flood: Vec<UnixStream> = (0..2 * api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut refused = 0;
    for mut s in flood {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        match parse_response(&out) {
            (503, body) => {
                refused += 1;
                expect_error(
                    "flood",
                    (503, body),
                    503,
                    "too many API connections at once",
                );
            }
            answer => expect_error("flood", answer, 400, "was not complete within"),
        }
    }
    assert!(refused >= 1, "no connection of the flood was refused");
    assert_eq!(call(&sock, "GET", "/status", None).0, 200);

    // A second `vmbeam run` on the same socket fails with one clear
    // sentence, and leaves the first one's socket working.
    let out = bin()
        .args(["run", "--duration", "5", "--api-sock"])
        .arg(&sock)
        .arg("--console-dir")
        .arg(dir.join("second"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "API socket {} is in use by another process",
            sock.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(sock.exists());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Nothing changed, and everything still runs.
    let after = status(&sock);
    assert_eq!(shape(&after), shape(&before));
    assert_eq!(after.host_vms[0].status, "running");
    assert!(run.0.try_wait().unwrap().is_none(), "vmbeam run exited");
    let lines = console_lines(&after);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = console_lines(&status(&sock));
        if now.iter().zip(&lines).all(|(n, l)| n > l) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nested guests stopped printing: {lines:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(shape(&status(&sock)), shape(&before));

    // And the API still works for real requests.
    assert_eq!(call(&sock, "PUT", "/shutdown", None).0, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmbeam run did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success());
    assert!(!sock.exists());
}

#[test]
fn run_refuses_socket_paths_it_cannot_use() {
    if !common::kvm_or_skip("run_refuses_socket_paths_it_cannot_use") {
        return;
    }
    let dir = common::temp_dir("edges-paths");
    let run_at = |sock: &Path| {
        bin()
            .args(["run", "--duration", "5", "--nested", "0", "--api-sock"])
            .arg(sock)
            .arg("--console-dir")
            .arg(dir.join("consoles"))
            .output()
            .unwrap()
    };
    // A regular file is not replaced.
    let file = dir.join("precious.txt");
    std::fs::write(&file, "keep me").unwrap();
    let out = run_at(&file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the path exists and is not a socket (refusing to replace it)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // Nor a directory.
    let sub = dir.join("a-directory");
    std::fs::create_dir_all(&sub).unwrap();
    let out = run_at(&sub);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert!(sub.is_dir());
    // A directory that does not exist.
    let out = run_at(Path::new("/nonexistent-vmbeam-dir/api.sock"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot create API socket /nonexistent-vmbeam-dir/api.sock"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A stale socket (nobody listening) is replaced, and the new one is 0600.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut child = bin()
        .args(["run", "--duration", "600", "--nested", "0", "--api-sock"])
        .arg(&stale)
        .arg("--console-dir")
        .arg(dir.join("consoles"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while api::call(&stale, "GET", "/status", None).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "vmbeam run exited");
        assert!(Instant::now() < deadline, "the API never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(call(&stale, "PUT", "/shutdown", None).0, 200);
    assert!(child.wait().unwrap().success());
}

#[test]
fn clients_without_a_server_fail_with_one_clear_sentence() {
    let dir = common::temp_dir("edges-client");
    let missing = PathBuf::from("/nonexistent-vmbeam-dir/vmbeam.sock");
    match api::call(&missing, "GET", "/status", None) {
        Err(e @ ApiError::Connect { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains(
                    "cannot connect to the vmbeam API at /nonexistent-vmbeam-dir/vmbeam.sock"
                ),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A socket file nobody listens on, and a path that is not a socket.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    for sock in [missing.as_path(), stale.as_path(), file.as_path()] {
        for args in [
            &["status"][..],
            &["rejuvenate", "--json"],
            &["rejuvenate", "--vm", "hv0", "--fault", "reject-first"],
            &["shutdown"],
        ] {
            let out = bin()
                .args(args)
                .arg("--api-sock")
                .arg(sock)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{args:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.starts_with(&format!(
                    "vmbeam: error: cannot connect to the vmbeam API at {}",
                    sock.display()
                )),
                "{args:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }
    // Nothing was created or removed.
    assert!(!missing.exists());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}
