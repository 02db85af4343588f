//! HTTP/1.1 framing for the control API: one request per connection on a
//! Unix socket, parsed by `httparse` (the parser under hyper), with our own
//! limits, deadline and body framing around it (docs/api.md says why).
//!
//! What is accepted: a request line with a method, an origin-form path and
//! `HTTP/1.0` or `HTTP/1.1`; at most [`MAX_HEADERS`] headers in at most
//! [`MAX_HEAD`] bytes; a body of exactly `Content-Length` bytes (at most
//! [`MAX_BODY`], UTF-8). `Transfer-Encoding` and repeated `Content-Length`
//! are refused rather than guessed at. `Expect: 100-continue` is answered.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest request or response body.
pub const MAX_BODY: usize = 1 << 20;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines in a request or response.
pub const MAX_HEADERS: usize = 64;
/// Time a client has to send its whole request (and to take the answer).
pub const REQUEST_TIME: Duration = Duration::from_secs(5);

/// Errors of the HTTP framing.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer sent something that is not an acceptable HTTP request or
    /// response.
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    /// The request did not arrive in time.
    #[error("the request was not complete within {0:?}")]
    TimedOut(Duration),
    /// I/O failed.
    #[error("API connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting to the API socket failed.
    #[error("cannot connect to the vmbeam API at {path}: {source} (is `vmbeam run --api-sock {path}` running?)", path = .path.display())]
    Connect {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

fn malformed(s: impl Into<String>) -> HttpError {
    HttpError::Malformed(s.into())
}

/// A request as the server parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method (`GET`, `POST`, ...), as sent.
    pub method: String,
    /// Path, as sent (a query string, if any, is split off into `query`).
    pub path: String,
    /// Query string after `?`, without it (empty if none).
    pub query: String,
    /// Body (`Content-Length` bytes, UTF-8).
    pub body: String,
}

/// The parsed head of a request.
struct Head {
    method: String,
    target: String,
    content_length: usize,
    expect_continue: bool,
    /// Bytes after the head already read (the start of the body).
    rest: Vec<u8>,
}

/// Reads from `r`, mapping read timeouts to [`HttpError::TimedOut`].
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, HttpError> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::TimedOut(REQUEST_TIME))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_head(r: &mut impl Read) -> Result<Head, HttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default().to_string();
                if !target.starts_with('/') {
                    return Err(malformed(format!(
                        "request target '{}' is not an absolute path",
                        target.escape_debug()
                    )));
                }
                let mut content_length = None;
                let mut expect_continue = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        // Without this a chunked body would be read as an
                        // empty one, and an empty POST /rejuvenate means
                        // "the default".
                        return Err(malformed(
                            "Transfer-Encoding is not supported; send a Content-Length",
                        ));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|v| v.parse::<usize>().ok())
                            .ok_or_else(|| malformed("bad Content-Length"))?;
                        if content_length.is_some_and(|c| c != v) {
                            return Err(malformed("conflicting Content-Length headers"));
                        }
                        content_length = Some(v);
                    }
                    if h.name.eq_ignore_ascii_case("expect") {
                        if h.value.eq_ignore_ascii_case(b"100-continue") {
                            expect_continue = true;
                        } else {
                            return Err(malformed("unsupported Expect header"));
                        }
                    }
                }
                let content_length = content_length.unwrap_or(0);
                if content_length > MAX_BODY {
                    return Err(malformed(format!(
                        "body of {content_length} bytes is too large (at most {MAX_BODY})"
                    )));
                }
                return Ok(Head {
                    method,
                    target,
                    content_length,
                    expect_continue,
                    rest: buf[n..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(malformed(format!("more than {MAX_HEADERS} header lines")))
            }
            Err(httparse::Error::Version) => {
                return Err(malformed(
                    "the request line must end in HTTP/1.0 or HTTP/1.1",
                ))
            }
            Err(e) => {
                // Name the usual mistakes in the request line itself.
                let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                let parts: Vec<&[u8]> = line
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|p| !p.is_empty())
                    .collect();
                let method_like = parts
                    .first()
                    .is_some_and(|m| m.iter().all(u8::is_ascii_alphabetic));
                return Err(malformed(match parts.len() {
                    1 if method_like => {
                        "the request line has no path (want METHOD PATH HTTP/1.1)".to_string()
                    }
                    2 if method_like => {
                        "the request line must end in HTTP/1.0 or HTTP/1.1".to_string()
                    }
                    _ => format!("invalid request head: {e}"),
                }));
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(malformed(format!(
                "request head longer than {MAX_HEAD} bytes"
            )));
        }
        let want = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = read_some(r, &mut chunk[..want])?;
        if n == 0 {
            return Err(malformed(if buf.iter().all(u8::is_ascii_whitespace) {
                "empty request"
            } else {
                "connection closed before the end of the request head"
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_body(r: &mut impl Read, head: Head) -> Result<Request, HttpError> {
    let len = head.content_length;
    let mut body = head.rest;
    body.truncate(len);
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let n = read_some(r, &mut chunk[..want])?;
        if n == 0 {
            return Err(malformed(format!(
                "the body ended before its Content-Length of {len} bytes"
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(body).map_err(|_| malformed("body is not UTF-8"))?;
    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (head.target, String::new()),
    };
    Ok(Request {
        method: head.method,
        path,
        query,
        body,
    })
}

/// Parses one request from `bytes` exactly as the server does (same
/// limits, same errors); used by tests and the fuzzer.
pub fn parse_request(bytes: &[u8]) -> Result<Request, HttpError> {
    let mut r = bytes;
    let head = read_head(&mut r)?;
    read_body(&mut r, head)
}

/// A stream whose reads fail once `deadline` has passed, so a client that
/// trickles bytes cannot hold a connection slot beyond it.
pub struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    /// Reads from `stream` until `within` from now.
    pub fn new(stream: &'a UnixStream, within: Duration) -> Self {
        DeadlineReader {
            stream,
            deadline: Instant::now() + within,
        }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

/// Reads one request from `stream` within `within`, answering
/// `Expect: 100-continue` before the body.
pub fn read_request(stream: &UnixStream, within: Duration) -> Result<Request, HttpError> {
    let mut r = DeadlineReader::new(stream, within);
    let head = read_head(&mut r).map_err(|e| match e {
        HttpError::TimedOut(_) => HttpError::TimedOut(within),
        e => e,
    })?;
    if head.expect_continue && head.rest.len() < head.content_length {
        let mut w = stream;
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    read_body(&mut r, head).map_err(|e| match e {
        HttpError::TimedOut(_) => HttpError::TimedOut(within),
        e => e,
    })
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Body.
    pub body: String,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// `Allow` header (405 answers).
    pub allow: Option<String>,
    /// `Location` header (202 answers).
    pub location: Option<String>,
}

impl Response {
    /// A JSON response.
    pub fn json(code: u16, body: String) -> Response {
        Response {
            code,
            body,
            content_type: "application/json",
            allow: None,
            location: None,
        }
    }
}

/// Reason phrase of `code`.
pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Writes `resp`; with `head_only` (a HEAD request) the body is left out
/// but `Content-Length` still says how long it would be.
pub fn write_response(mut w: impl Write, resp: &Response, head_only: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.code,
        reason(resp.code),
        resp.content_type,
        resp.body.len()
    );
    if let Some(a) = &resp.allow {
        out.push_str(&format!("Allow: {a}\r\n"));
    }
    if let Some(l) = &resp.location {
        out.push_str(&format!("Location: {l}\r\n"));
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&resp.body);
    }
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// A response as the client parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// Status code.
    pub code: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl ClientResponse {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole response (status, headers, `Content-Length` body).
pub fn parse_response(bytes: &[u8], head_only: bool) -> Result<ClientResponse, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(malformed("the response ended in its head"));
        }
        Err(e) => return Err(malformed(format!("invalid response: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &bytes[n..];
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse::<usize>())
        .transpose()
        .map_err(|_| malformed("bad Content-Length in the response"))?;
    let body = if head_only {
        &rest[..0]
    } else {
        match len {
            Some(l) if l > rest.len() => {
                return Err(malformed(format!(
                    "the response body ended before its Content-Length of {l} bytes"
                )))
            }
            Some(l) => &rest[..l],
            None => rest,
        }
    };
    Ok(ClientResponse {
        code,
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Longest a client waits for an answer (a synchronous rejuvenation can
/// take its timeout of up to an hour; this is the client's own bound).
pub const CLIENT_TIME: Duration = Duration::from_secs(3700);

/// Sends one request to the API at `sock` and reads the whole answer.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<ClientResponse, HttpError> {
    let s = UnixStream::connect(sock).map_err(|source| HttpError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    s.set_write_timeout(Some(REQUEST_TIME))?;
    s.set_read_timeout(Some(CLIENT_TIME))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    (&s).write_all(req.as_bytes())?;
    let mut out = Vec::new();
    (&s).take((MAX_BODY * 16) as u64).read_to_end(&mut out)?;
    parse_response(&out, method == "HEAD")
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
        let r = parse_request(b"GET /status?x=1 HTTP/1.0\n\n").unwrap();
        assert_eq!((r.method.as_str(), r.body.as_str()), ("GET", ""));
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/status", "x=1"));
    }

    #[test]
    fn bad_requests_get_one_clear_error() {
        assert!(err(b"").contains("empty request"));
        assert!(err(b"GET\r\n\r\n").contains("has no path"));
        assert!(err(b"GET /status\r\n\r\n").contains("must end in HTTP/1.0 or HTTP/1.1"));
        assert!(err(b"GET /status HTTP/2.0\r\n\r\n").contains("HTTP/1.0 or HTTP/1.1"));
        assert!(err(b"\x16\x03\x01\x02\n\n").contains("invalid request head"));
        assert!(err(b"GET * HTTP/1.1\r\n\r\n").contains("not an absolute path"));
        assert!(err(b"GET /status HTTP/1.1\r\nHost: x\r\n").contains("end of the request head"));
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n").contains("bad Content-Length")
        );
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: +1\r\n\r\n").contains("bad Content-Length")
        );
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
                .contains("bad Content-Length")
        );
        assert!(
            err(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}")
                .contains("conflicting Content-Length")
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
        assert!(err(b"GET /\xff HTTP/1.1\r\n\r\n").contains("malformed HTTP"));
        assert!(err(
            b"POST /rejuvenate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"vm\":1}\r\n0\r\n\r\n"
        )
        .contains("Transfer-Encoding is not supported"));
    }

    #[test]
    fn heads_and_headers_are_bounded() {
        let long = vec![b'a'; MAX_HEAD * 4];
        assert!(err(&long).contains("malformed HTTP"));
        let mut req = b"GET /".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_HEAD * 4));
        assert!(err(&req).contains("request head longer than"));
        let mut req = b"GET /status HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            req.extend_from_slice(b"X-A: b\r\n");
        }
        req.extend_from_slice(b"\r\n");
        assert!(err(&req).contains("header lines"));
        // Exactly the limit is fine.
        let mut req = b"GET /status HTTP/1.1\r\n".to_vec();
        for _ in 0..MAX_HEADERS {
            req.extend_from_slice(b"X-A: b\r\n");
        }
        req.extend_from_slice(b"\r\n");
        assert!(parse_request(&req).is_ok());
    }

    #[test]
    fn responses_round_trip_and_head_has_no_body() {
        let mut r = Response::json(405, "{\"error\":\"x\"}".into());
        r.allow = Some("GET, HEAD".into());
        let mut out = Vec::new();
        write_response(&mut out, &r, false).unwrap();
        let p = parse_response(&out, false).unwrap();
        assert_eq!((p.code, p.body.as_str()), (405, "{\"error\":\"x\"}"));
        assert_eq!(p.header("allow"), Some("GET, HEAD"));
        let mut out = Vec::new();
        write_response(&mut out, &r, true).unwrap();
        assert!(out.ends_with(b"\r\n\r\n"), "HEAD answer has no body");
        let p = parse_response(&out, true).unwrap();
        assert_eq!(p.header("content-length"), Some("13"));
        assert!(p.body.is_empty());
    }
}
