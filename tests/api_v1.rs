//! The versioned API against a live `vmbeam run` on real /dev/kvm: the
//! ping, the legacy aliases, what HTTP is refused (no version, arrays as
//! bodies, `null` enums, integers beyond int64), 405 with `Allow`, HEAD
//! without a body, and the connection cap answering 503 once the request
//! was read.

mod common;

use common::server::{call, Run};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmbeam_vmm::api;

fn start(dir: &Path, sock: &Path) -> Run {
    common::server::start_run(dir, sock, &["--nested", "1"], 1)
}

/// Sends raw bytes, returns the raw answer.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn expect(what: &str, (code, body): (u16, String), want: u16, text: &str) {
    assert_eq!(code, want, "{what}: {body}");
    assert!(body.contains(text), "{what}: {body:?} lacks {text:?}");
}

#[test]
fn versioned_routes_ping_and_the_http_the_spec_refuses() {
    if !common::kvm_or_skip("versioned_routes_ping_and_the_http_the_spec_refuses") {
        return;
    }
    let dir = common::temp_dir("api-v1");
    let sock = dir.join("api.sock");
    let run = start(&dir, &sock);

    // Ping: this process, this version, the features.
    let (code, body) = call(&sock, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(code, 200, "{body}");
    let ping: api::Ping = serde_json::from_str(&body).unwrap();
    assert_eq!(ping.pid, run.0.id());
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert!(ping.features.iter().any(|f| f == "jobs"), "{body}");

    // The legacy path is an alias of the versioned one.
    let v1: serde_json::Value =
        serde_json::from_str(&call(&sock, "GET", "/api/v1/status", None).1).unwrap();
    let old: serde_json::Value =
        serde_json::from_str(&call(&sock, "GET", "/status", None).1).unwrap();
    assert_eq!(v1["host_vms"][0]["name"], "hv0");
    assert_eq!(old["host_vms"][0]["name"], v1["host_vms"][0]["name"]);
    // A query string is ignored, not part of the path.
    assert_eq!(call(&sock, "GET", "/api/v1/status?x=1", None).0, 200);

    // 405 names the allowed methods in Allow.
    let r = api::request(&sock, "DELETE", "/api/v1/status", None).unwrap();
    assert_eq!(r.code, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = api::request(&sock, "GET", "/api/v1/rejuvenate", None).unwrap();
    assert_eq!((r.code, r.header("allow")), (405, Some("POST")));
    let r = api::request(&sock, "POST", "/api/v1/jobs/1", None).unwrap();
    assert_eq!(r.header("allow"), Some("GET, HEAD, DELETE"));

    // HEAD: the GET's headers, no body.
    let head = raw(&sock, b"HEAD /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let (hdrs, rest) = head.split_once("\r\n\r\n").unwrap();
    assert!(rest.is_empty(), "HEAD got a body: {rest:?}");
    let len: usize = hdrs
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(len > 10, "{hdrs}");

    // A request line without its HTTP version is refused.
    let noversion = raw(&sock, b"GET /api/v1/status\r\n\r\n");
    assert!(noversion.starts_with("HTTP/1.1 400"), "{noversion}");
    assert!(
        noversion.contains("must end in HTTP/1.0 or HTTP/1.1"),
        "{noversion}"
    );

    // Bodies: objects only; null enums and int64 overflow refused.
    let post = |path: &str, body: &str| call(&sock, "POST", path, Some(body));
    expect(
        "array as rejuvenate body",
        post("/api/v1/rejuvenate", r#"["hv0","copy"]"#),
        400,
        "the body must be a JSON object",
    );
    expect(
        "array as checksum body",
        post("/api/v1/checksum", r#"["l2-0",0,8]"#),
        400,
        "the body must be a JSON object",
    );
    expect(
        "null mode",
        post("/api/v1/rejuvenate", r#"{"mode":null}"#),
        400,
        "invalid type: null",
    );
    expect(
        "null fault",
        post("/api/v1/rejuvenate", r#"{"fault":null}"#),
        400,
        "invalid type: null",
    );
    expect(
        "negative downtime",
        post("/api/v1/rejuvenate", r#"{"downtime_ms":-1}"#),
        400,
        "bad rejuvenate request",
    );
    expect(
        "downtime beyond int64",
        post(
            "/api/v1/rejuvenate",
            r#"{"downtime_ms":9223372036854775808}"#,
        ),
        400,
        "above the int64 maximum",
    );
    expect(
        "gpa = 2^63",
        post(
            "/api/v1/checksum",
            r#"{"guest":"l2-0","gpa":9223372036854775808,"len":8}"#,
        ),
        400,
        "above the int64 maximum",
    );
    expect(
        "inspect gpa string with spaces",
        post(
            "/api/v1/inspect",
            r#"{"guest":"l2-0","gpa":" 4096","len":8}"#,
        ),
        400,
        "invalid number",
    );
    expect(
        "inspect gpa string = 2^63",
        post(
            "/api/v1/inspect",
            r#"{"guest":"l2-0","gpa":"0x8000000000000000","len":8}"#,
        ),
        400,
        "above",
    );
    expect(
        "unmapped range",
        post(
            "/api/v1/checksum",
            r#"{"guest":"l2-0","gpa":4611686018427387904,"len":8}"#,
        ),
        404,
        "cannot inspect l2-0",
    );
    // And what is right is served.
    let (code, body) = post(
        "/api/v1/inspect",
        r#"{"guest":"l2-0","gpa":"0x1000","len":"16"}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(
        "/api/v1/checksum",
        r#"{"guest":"l2-0","gpa":4096,"len":64}"#,
    );
    assert_eq!(code, 200, "{body}");
    expect(
        "no such job",
        call(&sock, "GET", "/api/v1/jobs/99", None),
        404,
        "no job 99",
    );
    expect(
        "job id not a number",
        call(&sock, "DELETE", "/api/v1/jobs/x1", None),
        404,
        "no job x1",
    );
    let _ = call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}

#[test]
fn a_client_over_the_connection_cap_gets_503_after_its_request() {
    if !common::kvm_or_skip("a_client_over_the_connection_cap_gets_503_after_its_request") {
        return;
    }
    let dir = common::temp_dir("api-cap");
    let sock = dir.join("api.sock");
    let _run = start(&dir, &sock);
    // Hold every slot with a connection that sends nothing.
    let idle: Vec<UnixStream> = (0..api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // Let the server accept them all before the next one.
    std::thread::sleep(Duration::from_millis(300));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The answer comes only after the request: nothing is waiting yet.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"{"error":"too many API connections at once (at most 32); try again"}"#),
        "{text}"
    );
    drop(idle);
    // The slots come back: the server answers as before.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = call(&sock, "GET", "/api/v1/status", None);
        if code == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {code}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = call(&sock, "PUT", "/api/v1/vmm.shutdown", None);
}
