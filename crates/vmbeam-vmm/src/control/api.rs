//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (like
//! Firecracker and Cloud Hypervisor), and the small client the CLI uses.
//! `docs/api.yaml` is its OpenAPI description.
//!
//! Routes: `GET /status`, `POST /rejuvenate`, `POST /checksum`,
//! `POST /inspect`, `PUT /shutdown`. The socket is created owner-only
//! (0600), which is what keeps `/inspect` (reading guest memory and
//! registers) to the user who runs vmbeam.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::boot::fault;

use crate::migration::rejuvenate::{Mode, RejuvenateOptions};
use crate::migration::remote::MigrateOptions;
use crate::migration::tls::TlsDir;
use crate::vmm::{Vmm, VmmError};

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is taken by something live.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The socket path names something that is not a socket; it is left alone.
    #[error("cannot create API socket {}: the path exists and is not a socket (refusing to replace it)", .0.display())]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the vmbeam API at {path}: {source} (is `vmbeam run --api-sock {path}` running?)", path = .path.display())]
    Connect {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// I/O on a connection failed.
    #[error("API connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not HTTP.
    #[error("malformed HTTP: {0}")]
    Malformed(String),
}

/// Request body of `POST /rejuvenate`.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RejuvenateRequest {
    /// Host VM line (default: the first).
    pub vm: Option<String>,
    /// Mode (default zero-copy).
    pub mode: Option<Mode>,
    /// Hash guests before/after (default true).
    pub verify: Option<bool>,
    /// Fault to inject into the successor (tests): reject-first,
    /// crash-before-adopt, crash-after-first, hang-at-boot.
    pub fault: Option<String>,
    /// Give up after this many seconds (default 60).
    pub timeout_secs: Option<u64>,
    /// Pre-copy downtime budget in ms (default 300).
    pub downtime_ms: Option<u64>,
}

/// Request body of `POST /migrate`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Host VM line (default: the first).
    pub vm: Option<String>,
    /// Destination, `tcp://HOST:PORT`.
    pub to: String,
    /// Pre-copy downtime budget in ms (default 300).
    pub downtime_ms: Option<u64>,
    /// Directory with ca.pem, cert.pem and key.pem for mutual TLS (default: plain TCP).
    #[serde(default)]
    pub tls_dir: Option<std::path::PathBuf>,
}

/// Request body of `POST /checksum`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumRequest {
    /// Nested guest.
    pub guest: String,
    /// Nested guest-physical start (8-aligned).
    pub gpa: u64,
    /// Length (multiple of 8).
    pub len: u64,
}

/// Request body of `POST /inspect`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InspectRequest {
    /// Nested guest.
    pub guest: String,
    /// Nested guest-physical start: an integer or a string (`"0x1000"`).
    #[serde(default = "zero")]
    pub gpa: crate::control::inspect::Number,
    /// Bytes to read (at most 64 KiB); 0 reads only the registers.
    #[serde(default = "zero")]
    pub len: crate::control::inspect::Number,
}

fn zero() -> crate::control::inspect::Number {
    crate::control::inspect::Number::Int(0)
}

/// Parses a fault name.
pub fn parse_fault(s: &str) -> Option<u64> {
    Some(match s {
        "reject-first" => fault::REJECT_FIRST,
        "crash-before-adopt" => fault::CRASH_BEFORE_ADOPT,
        "crash-after-first" => fault::CRASH_AFTER_FIRST,
        "hang-at-boot" => fault::HANG_AT_BOOT,
        "aged-crash-after-first" => fault::AGED_CRASH_AFTER_FIRST,
        "flip-byte-before-verify" => fault::FLIP_BYTE_BEFORE_VERIFY,
        "aged-lie-state" => fault::AGED_LIE_STATE,
        "aged-spam-done" => fault::AGED_SPAM_DONE,
        "spam-map" => fault::SPAM_MAP,
        _ => return None,
    })
}

/// A bound API socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// Set by `PUT /shutdown`.
    pub shutdown: AtomicBool,
    /// Connections being served now (threaded server).
    active: AtomicUsize,
}

/// Most connections the threaded server serves at once; a connection
/// beyond that is answered 503 at once instead of getting a thread.
pub const MAX_CONNECTIONS: usize = 32;

impl ApiServer {
    /// Binds `path` (owner-only); a stale socket file is replaced.
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        // Create the socket owner-only from the start (not only after the
        // chmod below), so no other user can connect in between.
        // SAFETY: umask only swaps the process file-mode mask; it is
        // restored right after bind.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old_mask) };
        let listener = bound.map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            shutdown: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        })
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Serves every pending connection.
    pub fn accept_all(&self, vmm: &Vmm) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = self.serve(vmm, stream);
        }
    }

    /// Serves every pending connection, each on its own thread, so a long
    /// request (a rejuvenation, a migration) does not hold up `GET /status`
    /// and a concurrent rejuvenation gets its 409.
    pub fn accept_all_threaded(self: &Arc<Self>, vmm: &Arc<Vmm>) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.active.fetch_sub(1, Ordering::SeqCst);
                // A short answer fits the socket buffer: this does not block.
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let msg = format!(
                    "too many API connections at once (at most {MAX_CONNECTIONS}); try again"
                );
                let _ = respond(&stream, 503, &err_json(&msg));
                continue;
            }
            let (me, vmm) = (self.clone(), vmm.clone());
            let spawned = std::thread::Builder::new()
                .name("vmbeam-api".into())
                .spawn(move || {
                    // Give the slot back even if serving panics.
                    struct Done<'a>(&'a AtomicUsize);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _done = Done(&me.active);
                    let _ = me.serve(&vmm, stream);
                });
            if spawned.is_err() {
                // Out of threads: the client sees its connection close.
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn serve(&self, vmm: &Vmm, stream: UnixStream) -> Result<(), ApiError> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(REQUEST_TIME))?;
        let mut reader = BufReader::new(DeadlineReader {
            stream: stream.try_clone()?,
            deadline: Instant::now() + REQUEST_TIME,
        });
        let (method, path, body) = match read_request(&mut reader) {
            Ok(r) => r,
            Err(e) => {
                return respond(&stream, 400, &err_json(&e.to_string()));
            }
        };
        let (code, body) = self.route(vmm, &method, &path, &body);
        // The client may have gone away; that changes nothing here.
        let _ = respond(&stream, code, &body);
        Ok(())
    }

    /// Handles one request; returns status code and JSON body.
    pub fn route(&self, vmm: &Vmm, method: &str, path: &str, body: &str) -> (u16, String) {
        match (method, path) {
            ("GET", "/status") => (200, to_json(&vmm.status())),
            ("POST", "/rejuvenate") => {
                let req: RejuvenateRequest = if body.trim().is_empty() {
                    RejuvenateRequest::default()
                } else {
                    match serde_json::from_str(body) {
                        Ok(r) => r,
                        Err(e) => return (400, err_json(&format!("bad rejuvenate request: {e}"))),
                    }
                };
                let mut opts = RejuvenateOptions {
                    mode: req.mode.unwrap_or(Mode::ZeroCopy),
                    verify: req.verify.unwrap_or(true),
                    ..Default::default()
                };
                if let Some(d) = req.downtime_ms {
                    opts.downtime_budget = Duration::from_millis(d.clamp(1, 60_000));
                }
                if let Some(t) = req.timeout_secs {
                    opts.timeout = Duration::from_secs(t.clamp(1, 3600));
                }
                if let Some(f) = &req.fault {
                    match parse_fault(f) {
                        Some(v) => opts.fault = v,
                        None => return (400, err_json(&format!("unknown fault '{f}'"))),
                    }
                }
                match vmm.rejuvenate(req.vm.as_deref(), &opts) {
                    Ok(r) => (200, to_json(&r)),
                    Err(e) => (error_code(&e), err_json(&e.to_string())),
                }
            }
            ("POST", "/checksum") => {
                let req: ChecksumRequest = match serde_json::from_str(body) {
                    Ok(r) => r,
                    Err(e) => return (400, err_json(&format!("bad checksum request: {e}"))),
                };
                match vmm.checksum(&req.guest, req.gpa, req.len) {
                    Ok(c) => (200, format!("{{\"checksum\":\"{c:016x}\"}}")),
                    Err(e) => (error_code(&e), err_json(&e.to_string())),
                }
            }
            ("POST", "/inspect") => {
                let req: InspectRequest = match serde_json::from_str(body) {
                    Ok(r) => r,
                    Err(e) => return (400, err_json(&format!("bad inspect request: {e}"))),
                };
                let res = req
                    .gpa
                    .value()
                    .and_then(|gpa| Ok((gpa, req.len.value()?)))
                    .map_err(VmmError::from)
                    .and_then(|(gpa, len)| vmm.inspect(&req.guest, gpa, len));
                match res {
                    Ok(i) => (200, to_json(&i)),
                    Err(e) => (error_code(&e), err_json(&e.to_string())),
                }
            }
            ("POST", "/migrate") => {
                let req: MigrateRequest = match serde_json::from_str(body) {
                    Ok(r) => r,
                    Err(e) => return (400, err_json(&format!("bad migrate request: {e}"))),
                };
                let budget = Duration::from_millis(req.downtime_ms.unwrap_or(300).clamp(1, 60_000));
                let tls = match req.tls_dir.as_deref().map(TlsDir::load).transpose() {
                    Ok(t) => t,
                    Err(e) => return (400, err_json(&e.to_string())),
                };
                let opts = MigrateOptions {
                    downtime: budget,
                    tls,
                    ..Default::default()
                };
                match vmm.migrate_with(req.vm.as_deref(), &req.to, &opts) {
                    Ok(r) => (200, to_json(&r)),
                    Err(e) => (error_code(&e), err_json(&e.to_string())),
                }
            }
            ("PUT", "/shutdown") => {
                self.shutdown.store(true, Ordering::SeqCst);
                (200, "{\"ok\":true}".into())
            }
            (
                _,
                "/status" | "/rejuvenate" | "/checksum" | "/inspect" | "/migrate" | "/shutdown",
            ) => (
                405,
                err_json(&format!("method {method} not allowed on {path}")),
            ),
            _ => (404, err_json(&format!("no such endpoint: {method} {path}"))),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn error_code(e: &VmmError) -> u16 {
    match e {
        VmmError::NoSuchVm(_) | VmmError::NoSuchGuest(_) => 404,
        VmmError::Busy => 409,
        VmmError::Remote(crate::migration::remote::RemoteError::Address(_)) => 400,
        VmmError::Inspect { .. } | VmmError::InspectRequest(_) => 400,
        _ => 500,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| err_json(&e.to_string()))
}

fn err_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// Largest request or response body.
pub const MAX_BODY: usize = 1 << 20;
/// Longest request line or header line, newline included.
pub const MAX_LINE: usize = 8 << 10;
/// Most header lines in a request or response.
pub const MAX_HEADERS: usize = 64;
/// Time a client has to send its whole request (and to take the answer).
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// A request as the server parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method (`GET`, `POST`, ...), as sent.
    pub method: String,
    /// Path, as sent.
    pub path: String,
    /// Body (`Content-Length` bytes, UTF-8).
    pub body: String,
}

/// Parses one HTTP/1.1 request from `bytes` exactly as the server does
/// (same limits, same errors); used by tests and the fuzzer.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ApiError> {
    let (method, path, body) = read_request(&mut std::io::Cursor::new(bytes))?;
    Ok(Request { method, path, body })
}

/// A stream whose reads fail once `deadline` has passed, so a client that
/// trickles bytes cannot hold the (single-threaded) API beyond it.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let late = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the request was not complete within {REQUEST_TIME:?}"),
            )
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => late(),
            _ => e,
        })
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; returns 0 at end of input.
fn read_line_bounded(r: &mut impl BufRead, what: &str) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if buf.len() >= MAX_LINE && !buf.ends_with(b"\n") {
        return Err(ApiError::Malformed(format!(
            "{what} longer than {MAX_LINE} bytes"
        )));
    }
    String::from_utf8(buf).map_err(|_| ApiError::Malformed(format!("{what} is not UTF-8")))
}

fn read_request(r: &mut impl BufRead) -> Result<(String, String, String), ApiError> {
    let line = read_line_bounded(r, "request line")?;
    let mut parts = line.split_whitespace();
    let method = parts
        .next()
        .ok_or_else(|| ApiError::Malformed("empty request".into()))?;
    let path = parts
        .next()
        .ok_or_else(|| ApiError::Malformed("no path".into()))?;
    let (method, path) = (method.to_string(), path.to_string());
    let len = read_headers(r)?;
    if len > MAX_BODY {
        return Err(ApiError::Malformed(format!(
            "body of {len} bytes is too large"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ApiError::Malformed(format!(
            "the body ended before its Content-Length of {len} bytes"
        )),
        _ => ApiError::Io(e),
    })?;
    let body =
        String::from_utf8(body).map_err(|_| ApiError::Malformed("body is not UTF-8".into()))?;
    Ok((method, path, body))
}

fn read_headers(r: &mut impl BufRead) -> Result<usize, ApiError> {
    let mut len = 0usize;
    for _ in 0..=MAX_HEADERS {
        let h = read_line_bounded(r, "header line")?;
        if h.is_empty() {
            return Err(ApiError::Malformed("connection closed in headers".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            return Ok(len);
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                // Without this a chunked body would be read as an empty
                // one, and an empty POST /rejuvenate means "the default".
                return Err(ApiError::Malformed(
                    "Transfer-Encoding is not supported; send a Content-Length".into(),
                ));
            }
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::Malformed("bad Content-Length".into()))?;
            }
        }
    }
    Err(ApiError::Malformed(format!(
        "more than {MAX_HEADERS} header lines"
    )))
}

fn respond(mut s: &UnixStream, code: u16, body: &str) -> Result<(), ApiError> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    Ok(())
}

/// Sends one request to the API at `sock`; returns status code and body.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ApiError> {
    let s = UnixStream::connect(sock).map_err(|source| ApiError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    let body = body.unwrap_or("");
    write!(
        &s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ApiError::Malformed(format!("bad status line '{}'", status.trim())))?;
    let len = read_headers(&mut r)?;
    let mut out = vec![0u8; len.min(MAX_BODY * 16)];
    r.read_exact(&mut out)?;
    Ok((code, String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        match parse_request(bytes) {
            Ok(r) => panic!("accepted {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn requests_parse() {
        let r = parse_request(
            b"POST /rejuvenate HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}trailing",
        )
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/rejuvenate")
        );
        assert_eq!(r.body, "{}");
        let r = parse_request(b"GET /status HTTP/1.1\n\n").unwrap();
        assert_eq!((r.method.as_str(), r.body.as_str()), ("GET", ""));
    }

    #[test]
    fn bad_requests_get_one_clear_error() {
        assert!(err(b"").contains("empty request"));
        assert!(err(b"GET\r\n\r\n").contains("no path"));
        assert!(err(b"GET /status HTTP/1.1\r\nHost: x\r\n").contains("closed in headers"));
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n").contains("bad Content-Length")
        );
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
                .contains("bad Content-Length")
        );
        let big = format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(err(big.as_bytes()).contains("too large"));
        assert!(err(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")
            .contains("the body ended before its Content-Length of 10 bytes"));
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe").contains("not UTF-8")
        );
        assert!(err(b"GET /\xff HTTP/1.1\r\n\r\n").contains("not UTF-8"));
        assert!(err(
            b"POST /rejuvenate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"vm\":1}\r\n0\r\n\r\n"
        )
        .contains("Transfer-Encoding is not supported"));
    }

    #[test]
    fn lines_and_headers_are_bounded() {
        let long = vec![b'a'; MAX_LINE * 4];
        assert!(err(&long).contains("request line longer than"));
        let mut req = b"GET /status HTTP/1.1\r\nX: ".to_vec();
        req.extend(std::iter::repeat_n(b'b', MAX_LINE));
        assert!(err(&req).contains("header line longer than"));
        let mut req = b"GET /status HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            req.extend_from_slice(b"X-A: b\r\n");
        }
        req.extend_from_slice(b"\r\n");
        assert!(err(&req).contains("header lines"));
        // Exactly the limit is fine.
        let mut req = b"GET /status HTTP/1.1\r\n".to_vec();
        for _ in 0..MAX_HEADERS - 1 {
            req.extend_from_slice(b"X-A: b\r\n");
        }
        req.extend_from_slice(b"\r\n");
        assert!(parse_request(&req).is_ok());
    }
}
