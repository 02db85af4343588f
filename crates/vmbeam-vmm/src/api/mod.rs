//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (like
//! Firecracker and Cloud Hypervisor), its routes, and the small client the
//! CLI uses. `docs/api.yaml` is its OpenAPI description; the framing is in
//! [`crate::api::http`].
//!
//! Routes live under `/api/v1/`; the unversioned paths of earlier releases
//! (`/status`, `/rejuvenate`, …) remain as aliases, and their `POST
//! /rejuvenate` and `POST /migrate` still answer only when the operation
//! ended. Under `/api/v1/` those two answer at once with a job
//! (`202 Accepted`) that `GET /api/v1/jobs/{id}` follows and `DELETE`
//! cancels. The socket is created owner-only (0600), which is what keeps
//! `inspect` (reading guest memory and registers) to the user who runs
//! vmbeam.

pub mod http;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmbeam_abi::boot::fault;

use crate::api::http::{HttpError, Request, Response};
use crate::control::jobs::{Job, JobError, JobKind};
use crate::migration::rejuvenate::{Mode, RejuvenateOptions};
use crate::migration::remote::MigrateOptions;
use crate::migration::tls::TlsDir;
use crate::vmm::{Vmm, VmmError};

pub use crate::api::http::{MAX_BODY, MAX_HEAD, MAX_HEADERS};

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
    /// The peer sent something that is not acceptable HTTP.
    #[error("{0}")]
    Http(HttpError),
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Connect { path, source } => ApiError::Connect { path, source },
            HttpError::Io(e) => ApiError::Io(e),
            e => ApiError::Http(e),
        }
    }
}

/// Deserializes a field that may be absent but, when present, must not be
/// `null` (enums whose schema has no `null`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Deserializes an optional integer that must fit an OpenAPI `int64`
/// with `minimum: 0` (0..=2^63-1).
fn int63_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<u64> = serde::Deserialize::deserialize(d)?;
    match v {
        Some(n) if n > i64::MAX as u64 => Err(serde::de::Error::custom(format!(
            "{n} is above the int64 maximum 9223372036854775807"
        ))),
        v => Ok(v),
    }
}

fn int63<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n: u64 = serde::Deserialize::deserialize(d)?;
    if n > i64::MAX as u64 {
        return Err(serde::de::Error::custom(format!(
            "{n} is above the int64 maximum 9223372036854775807"
        )));
    }
    Ok(n)
}

/// Request body of `POST /api/v1/rejuvenate`.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RejuvenateRequest {
    /// Host VM line (default: the first).
    pub vm: Option<String>,
    /// Mode (default zero-copy); `null` is refused.
    #[serde(default, deserialize_with = "present")]
    pub mode: Option<Mode>,
    /// Hash guests before/after (default true).
    pub verify: Option<bool>,
    /// Batch handover: each guest moves on its own (default false).
    pub batch: Option<bool>,
    /// Fault to inject into the successor (tests): reject-first,
    /// crash-before-adopt, crash-after-first, hang-at-boot,
    /// aged-crash-after-first, crash-after-moves (batch); `null` is refused.
    #[serde(default, deserialize_with = "present")]
    pub fault: Option<String>,
    /// Give up after this many seconds (default 60).
    #[serde(default, deserialize_with = "int63_opt")]
    pub timeout_secs: Option<u64>,
    /// Pre-copy downtime budget in ms (default 300).
    #[serde(default, deserialize_with = "int63_opt")]
    pub downtime_ms: Option<u64>,
}

/// Request body of `POST /api/v1/migrate`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Host VM line (default: the first).
    pub vm: Option<String>,
    /// Destination, `tcp://HOST:PORT`.
    pub to: String,
    /// Pre-copy downtime budget in ms (default 300).
    #[serde(default, deserialize_with = "int63_opt")]
    pub downtime_ms: Option<u64>,
    /// Directory with ca.pem, cert.pem and key.pem for mutual TLS (default: plain TCP).
    #[serde(default)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// `precopy` (default) or `postcopy`.
    #[serde(default)]
    pub mode: Option<MigrateMode>,
}

/// How a migration moves the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrateMode {
    /// Memory first, then the switch.
    Precopy,
    /// The switch first, then the memory.
    Postcopy,
}

/// Request body of `POST /api/v1/checksum`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumRequest {
    /// Nested guest.
    pub guest: String,
    /// Nested guest-physical start (a multiple of 8).
    #[serde(deserialize_with = "int63")]
    pub gpa: u64,
    /// Length (a multiple of 8).
    #[serde(deserialize_with = "int63")]
    pub len: u64,
}

/// Request body of `POST /api/v1/inspect`.
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

/// Answer of `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ping {
    /// vmbeam version.
    pub version: String,
    /// Process id of `vmbeam run`.
    pub pid: u32,
    /// What this server offers.
    pub features: Vec<String>,
}

/// Features `vmm.ping` lists.
pub const FEATURES: [&str; 6] = [
    "zero-copy",
    "copy",
    "precopy",
    "tcp-migration",
    "jobs",
    "metrics",
];

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
        "crash-after-moves" => fault::CRASH_AFTER_MOVES,
        _ => return None,
    })
}

/// A bound API socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// Set by `PUT /api/v1/vmm.shutdown`.
    pub shutdown: AtomicBool,
    /// Connections being served now.
    active: AtomicUsize,
    /// A descriptor held in reserve: when the process is out of
    /// descriptors, it is freed to accept the waiting connection and answer
    /// 503, so the listener drains instead of staying readable (which would
    /// spin the event loop) and clients get an answer.
    spare: std::sync::Mutex<Option<std::fs::File>>,
    /// Connections over the cap being answered 503 now.
    refusing: AtomicUsize,
}

/// Most connections served at once. A connection beyond that has its
/// request read (within [`REFUSE_TIME`]) and answered 503; at most as many
/// again are handled that way, and any further one is closed at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Time an over-the-cap client has to send its request before its 503.
pub const REFUSE_TIME: Duration = Duration::from_secs(1);

/// Gives a counter's slot back when dropped (also if serving panics).
struct Slot<'a>(&'a AtomicUsize);
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn err_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| err_json(&e.to_string()))
}

fn error_code(e: &VmmError) -> u16 {
    match e {
        VmmError::NoSuchVm(_) | VmmError::NoSuchGuest(_) | VmmError::Unmapped { .. } => 404,
        VmmError::Busy => 409,
        VmmError::Remote(
            crate::migration::remote::RemoteError::Address(_)
            | crate::migration::remote::RemoteError::Resolve { .. },
        ) => 400,
        VmmError::Inspect { .. } | VmmError::InspectRequest(_) => 400,
        _ => 500,
    }
}

fn vmm_err(e: &VmmError) -> Response {
    Response::json(error_code(e), err_json(&e.to_string()))
}

/// Parses a JSON object body into `T`; arrays, scalars and `null` are
/// refused (serde would take an array for a struct, field by position).
fn body<T: serde::de::DeserializeOwned>(what: &str, body: &str) -> Result<T, Response> {
    let bad = |m: String| Response::json(400, err_json(&format!("bad {what} request: {m}")));
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| bad(e.to_string()))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object".into()));
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Ping,
    Status,
    /// `sync`: the unversioned alias, which answers when it ended.
    Rejuvenate {
        sync: bool,
    },
    Migrate {
        sync: bool,
    },
    Checksum,
    Inspect,
    Shutdown,
    Metrics,
    Jobs,
    Job(String),
}

impl Route {
    fn find(path: &str) -> Option<Route> {
        Some(match path {
            "/api/v1/vmm.ping" => Route::Ping,
            "/api/v1/status" | "/status" => Route::Status,
            "/api/v1/rejuvenate" => Route::Rejuvenate { sync: false },
            "/rejuvenate" => Route::Rejuvenate { sync: true },
            "/api/v1/migrate" => Route::Migrate { sync: false },
            "/migrate" => Route::Migrate { sync: true },
            "/api/v1/checksum" | "/checksum" => Route::Checksum,
            "/api/v1/inspect" | "/inspect" => Route::Inspect,
            "/api/v1/vmm.shutdown" | "/shutdown" => Route::Shutdown,
            "/api/v1/metrics" => Route::Metrics,
            "/api/v1/jobs" => Route::Jobs,
            p => Route::Job(p.strip_prefix("/api/v1/jobs/")?.to_string()),
        })
    }

    /// Methods it serves, as in an `Allow` header.
    fn allow(&self) -> &'static str {
        match self {
            Route::Ping | Route::Status | Route::Metrics | Route::Jobs => "GET, HEAD",
            Route::Rejuvenate { .. } | Route::Migrate { .. } | Route::Checksum | Route::Inspect => {
                "POST"
            }
            Route::Shutdown => "PUT",
            Route::Job(_) => "GET, HEAD, DELETE",
        }
    }
}

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
            spare: std::sync::Mutex::new(std::fs::File::open("/dev/null").ok()),
            refusing: AtomicUsize::new(0),
        })
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The next pending connection, if any. Out of descriptors (EMFILE,
    /// ENFILE), it answers waiting clients 503 with the spare descriptor
    /// and goes on; without a spare it backs off for a moment instead of
    /// returning to a listener that is still readable.
    fn next_connection(&self) -> Option<UnixStream> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Some(s),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
                    if spare.take().is_none() {
                        *spare = std::fs::File::open("/dev/null").ok();
                        drop(spare);
                        std::thread::sleep(Duration::from_millis(10));
                        return None;
                    }
                    if let Ok((s, _)) = self.listener.accept() {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                        let msg = "vmbeam is out of file descriptors; try again";
                        let _ =
                            http::write_response(&s, &Response::json(503, err_json(msg)), false);
                        tracing::warn!("API request answered 503: {msg}");
                    }
                    *spare = std::fs::File::open("/dev/null").ok();
                }
                Err(_) => return None,
            }
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file (at shutdown; dropping the server does it too).
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves every pending connection, each on its own thread, so a long
    /// request (a synchronous rejuvenation) does not hold up `status`, and
    /// a concurrent rejuvenation gets its 409.
    pub fn accept_all_threaded(self: &Arc<Self>, vmm: &Arc<Vmm>) {
        while let Some(stream) = self.next_connection() {
            let over = self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS;
            if over {
                self.active.fetch_sub(1, Ordering::SeqCst);
                self.refuse(stream);
                continue;
            }
            let (me, vmm) = (self.clone(), vmm.clone());
            let spawned = std::thread::Builder::new()
                .name("vmbeam-api".into())
                .spawn(move || {
                    let _slot = Slot(&me.active);
                    me.serve(&vmm, stream);
                });
            if spawned.is_err() {
                // Out of threads: the client sees its connection close.
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Answers a connection over the cap: reads its request (briefly), then
    /// says 503. Beyond a second cap's worth of these, closes at once.
    fn refuse(self: &Arc<Self>, stream: UnixStream) {
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("API connection closed unanswered: too many connections at once");
            return;
        }
        let me = self.clone();
        let res = std::thread::Builder::new()
            .name("vmbeam-api-503".into())
            .spawn(move || {
                let _slot = Slot(&me.refusing);
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(REFUSE_TIME));
                let head_only = matches!(
                    http::read_request(&stream, REFUSE_TIME),
                    Ok(Request { ref method, .. }) if method == "HEAD"
                );
                let msg = format!(
                    "too many API connections at once (at most {MAX_CONNECTIONS}); try again"
                );
                let _ =
                    http::write_response(&stream, &Response::json(503, err_json(&msg)), head_only);
                tracing::warn!("API request answered 503: {msg}");
            });
        if res.is_err() {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn serve(&self, vmm: &Arc<Vmm>, stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(http::REQUEST_TIME));
        let req = match http::read_request(&stream, http::REQUEST_TIME) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!("API request refused: {e}");
                let _ = http::write_response(
                    &stream,
                    &Response::json(400, err_json(&e.to_string())),
                    false,
                );
                return;
            }
        };
        let resp = self.handle(vmm, &req);
        let level_ok = resp.code < 400;
        if level_ok {
            tracing::info!(method = %req.method, path = %req.path, code = resp.code, "API request");
        } else {
            tracing::warn!(method = %req.method, path = %req.path, code = resp.code, body = %resp.body, "API request failed");
        }
        // The client may have gone away; that changes nothing here.
        let _ = http::write_response(&stream, &resp, req.method == "HEAD");
    }

    /// Handles one parsed request.
    pub fn handle(&self, vmm: &Arc<Vmm>, req: &Request) -> Response {
        self.dispatch(vmm, Some(vmm), &req.method, &req.path, &req.body)
    }

    /// Handles one request without a served socket (tests); returns status
    /// code and JSON body. Job routes need [`ApiServer::handle`].
    pub fn route(&self, vmm: &Vmm, method: &str, path: &str, body: &str) -> (u16, String) {
        let r = self.dispatch(vmm, None, method, path, body);
        (r.code, r.body)
    }

    fn dispatch(
        &self,
        vmm: &Vmm,
        arc: Option<&Arc<Vmm>>,
        method: &str,
        path: &str,
        body: &str,
    ) -> Response {
        let Some(route) = Route::find(path) else {
            return Response::json(
                404,
                err_json(&format!(
                    "no such endpoint: {} {}",
                    method.escape_debug(),
                    path.escape_debug()
                )),
            );
        };
        let allowed = route.allow();
        let m = if method == "HEAD" { "GET" } else { method };
        if !allowed.split(", ").any(|a| a == m) {
            let mut r = Response::json(
                405,
                err_json(&format!(
                    "method {} not allowed on {} (allowed: {allowed})",
                    method.escape_debug(),
                    path.escape_debug()
                )),
            );
            r.allow = Some(allowed.to_string());
            return r;
        }
        match route {
            Route::Ping => Response::json(
                200,
                to_json(&Ping {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    features: FEATURES.iter().map(|s| s.to_string()).collect(),
                }),
            ),
            Route::Status => Response::json(200, to_json(&vmm.status())),
            Route::Metrics => {
                let text = crate::control::metrics::render(
                    &vmm.metrics,
                    &vmm.status(),
                    vmm.jobs.running().len(),
                );
                Response {
                    code: 200,
                    body: text,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    allow: None,
                    location: None,
                }
            }
            Route::Rejuvenate { sync } => match rejuvenate_options(body) {
                Err(r) => r,
                Ok((vm_name, opts)) => match arc {
                    Some(arc) => wait_if(sync, arc, start_rejuvenate_job(arc, vm_name, opts)),
                    None => match vmm.rejuvenate(vm_name.as_deref(), &opts) {
                        Ok(r) => Response::json(200, to_json(&r)),
                        Err(e) => vmm_err(&e),
                    },
                },
            },
            Route::Migrate { sync } => {
                let req: MigrateRequest = match self::body("migrate", body) {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                let budget = Duration::from_millis(req.downtime_ms.unwrap_or(300).clamp(1, 60_000));
                let tls = match req.tls_dir.as_deref().map(TlsDir::load).transpose() {
                    Ok(t) => t,
                    Err(e) => return Response::json(400, err_json(&e.to_string())),
                };
                let opts = MigrateOptions {
                    downtime: budget,
                    tls,
                    postcopy: req.mode == Some(MigrateMode::Postcopy),
                    ..Default::default()
                };
                match arc {
                    Some(arc) => wait_if(sync, arc, start_migrate_job(arc, req.vm, req.to, opts)),
                    None => match vmm.migrate_with(req.vm.as_deref(), &req.to, &opts) {
                        Ok(r) => Response::json(200, to_json(&r)),
                        Err(e) => vmm_err(&e),
                    },
                }
            }
            Route::Checksum => {
                let req: ChecksumRequest = match self::body("checksum", body) {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                match vmm.checksum(&req.guest, req.gpa, req.len) {
                    Ok(c) => Response::json(200, format!("{{\"checksum\":\"{c:016x}\"}}")),
                    Err(e) => vmm_err(&e),
                }
            }
            Route::Inspect => {
                let req: InspectRequest = match self::body("inspect", body) {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                let gpa = match api_number("gpa", &req.gpa, i64::MAX as u64) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let len = match api_number("len", &req.len, crate::control::inspect::MAX_LEN) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let res = vmm.inspect(&req.guest, gpa, len);
                match res {
                    Ok(i) => Response::json(200, to_json(&i)),
                    Err(e) => vmm_err(&e),
                }
            }
            Route::Shutdown => {
                self.shutdown.store(true, Ordering::SeqCst);
                Response::json(200, "{\"ok\":true}".into())
            }
            Route::Jobs => {
                let all: Vec<_> = vmm.jobs.all().iter().map(|j| j.view()).collect();
                Response::json(200, to_json(&all))
            }
            Route::Job(id) => {
                let job = id
                    .parse::<u64>()
                    .ok()
                    .filter(|_| id.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| vmm.jobs.get(n));
                let Some(job) = job else {
                    return Response::json(404, err_json(&format!("no job {}", id.escape_debug())));
                };
                if method == "DELETE" && !job.is_finished() {
                    job.progress.cancel();
                    tracing::info!(job = job.id, "job cancel requested");
                }
                Response::json(200, to_json(&job.view()))
            }
        }
    }
}

/// An inspect number as the API takes it (stricter than the CLI, exactly
/// what docs/api.yaml's patterns allow): an integer, or a string of decimal
/// digits or `0x` and hex digits (leading zeros allowed, nothing else),
/// at most `max`.
fn api_number(what: &str, n: &crate::control::inspect::Number, max: u64) -> Result<u64, Response> {
    use crate::control::inspect::Number;
    let bad =
        |why: &str| Response::json(400, err_json(&format!("bad inspect request: {what} {why}")));
    let v = match n {
        Number::Int(v) => *v,
        Number::Text(t) => {
            let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => (h, 16),
                None => (t.as_str(), 10),
            };
            let ok = !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix));
            let sig = digits.trim_start_matches('0');
            // Below 2^63 in decimal means at most 18 digits (as the
            // pattern says); in hex the value decides.
            if !ok || sig.len() > if radix == 10 { 18 } else { 16 } {
                return Err(vmm_err(&VmmError::from(
                    crate::control::inspect::InspectError::BadNumber(t.escape_debug().to_string()),
                )));
            }
            u64::from_str_radix(if sig.is_empty() { "0" } else { sig }, radix)
                .map_err(|_| bad("is out of range"))?
        }
    };
    if v > max {
        if what == "len" {
            return Err(vmm_err(&VmmError::from(
                crate::control::inspect::InspectError::TooLong { len: v },
            )));
        }
        return Err(bad(&format!("{v} is above {max}")));
    }
    Ok(v)
}

/// Parses a rejuvenate body into the line and the options.
fn rejuvenate_options(body: &str) -> Result<(Option<String>, RejuvenateOptions), Response> {
    let req: RejuvenateRequest = if body.trim().is_empty() {
        RejuvenateRequest::default()
    } else {
        self::body("rejuvenate", body)?
    };
    let mut opts = RejuvenateOptions {
        mode: req.mode.unwrap_or(Mode::ZeroCopy),
        verify: req.verify.unwrap_or(true),
        batch: req.batch.unwrap_or(false),
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
            None => {
                return Err(Response::json(
                    400,
                    err_json(&format!("unknown fault '{}'", f.escape_debug())),
                ))
            }
        }
    }
    Ok((req.vm, opts))
}

/// For the unversioned routes, which answer when the operation ended:
/// waits for the job `started` (a 202) and answers as the operation did.
/// Other answers (a refusal) and `sync == false` pass through.
fn wait_if(sync: bool, vmm: &Vmm, started: Response) -> Response {
    if !sync || started.code != 202 {
        return started;
    }
    let Some(job) = serde_json::from_str::<serde_json::Value>(&started.body)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .and_then(|id| vmm.jobs.get(id))
    else {
        return Response::json(500, err_json("the job vanished"));
    };
    // The operation's own deadlines end it; this only paces the wait.
    loop {
        match job.outcome() {
            Some(Ok(r)) => return Response::json(200, to_json(&r)),
            Some(Err(e)) => return Response::json(e.code, err_json(&e.message)),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn accepted(job: &Arc<Job>) -> Response {
    let mut r = Response::json(202, to_json(&job.view()));
    r.location = Some(format!("/api/v1/jobs/{}", job.id));
    r
}

/// Takes the right to run (409 if taken), checks the line exists (404),
/// and runs `work` on a thread as job `kind`.
fn start_job(
    vmm: &Arc<Vmm>,
    kind: JobKind,
    vm_name: Option<String>,
    work: impl FnOnce(
            &Arc<Vmm>,
            crate::vmm::Exclusive,
            &Arc<Job>,
        ) -> Result<crate::migration::rejuvenate::Report, VmmError>
        + Send
        + 'static,
) -> Response {
    let excl = match vmm.exclusive() {
        Ok(x) => x,
        Err(e) => return vmm_err(&e),
    };
    let line = match vmm.line(vm_name.as_deref()) {
        Ok(l) => l.name.clone(),
        Err(e) => return vmm_err(&e),
    };
    let job = vmm.jobs.add(kind, &line);
    let (v, j) = (vmm.clone(), job.clone());
    let spawned = std::thread::Builder::new()
        .name("vmbeam-job".into())
        .spawn(move || {
            tracing::info!(job = j.id, kind = ?j.kind, vm = %j.vm, "job started");
            let res = work(&v, excl, &j);
            match &res {
                Ok(r) => tracing::info!(job = j.id, total_ms = r.total_ms, "job done"),
                Err(e) => tracing::warn!(job = j.id, "job failed: {e}"),
            }
            j.finish(res.map_err(|e| JobError {
                code: error_code(&e),
                message: e.to_string(),
            }));
        });
    match spawned {
        Ok(_) => accepted(&job),
        Err(e) => {
            let msg = format!("cannot start a job thread: {e}");
            job.finish(Err(JobError {
                code: 500,
                message: msg.clone(),
            }));
            Response::json(500, err_json(&msg))
        }
    }
}

fn start_rejuvenate_job(
    vmm: &Arc<Vmm>,
    vm_name: Option<String>,
    mut opts: RejuvenateOptions,
) -> Response {
    let line = vm_name.clone();
    start_job(vmm, JobKind::Rejuvenate, vm_name, move |v, excl, job| {
        opts.progress = Some(job.progress.clone());
        v.rejuvenate_exclusive(
            excl,
            line.as_deref(),
            &opts,
            &crate::control::policy::Trigger::Manual,
        )
    })
}

fn start_migrate_job(
    vmm: &Arc<Vmm>,
    vm_name: Option<String>,
    to: String,
    mut opts: MigrateOptions,
) -> Response {
    // A bad or unresolvable address is refused now, not in the job.
    if let Err(e) = crate::migration::remote::parse_addr(&to) {
        return vmm_err(&VmmError::from(e));
    }
    let line = vm_name.clone();
    start_job(vmm, JobKind::Migrate, vm_name, move |v, excl, job| {
        opts.progress = Some(job.progress.clone());
        v.migrate_exclusive(excl, line.as_deref(), &to, &opts)
    })
}

/// Sends one request to the API at `sock`; returns status code and body.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ApiError> {
    let r = http::call(sock, method, path, body)?;
    Ok((r.code, r.body))
}

/// Sends one request to the API at `sock`; returns the whole response.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<http::ClientResponse, ApiError> {
    Ok(http::call(sock, method, path, body)?)
}

/// Parses one request from `bytes` exactly as the server does; used by
/// tests and the fuzzer.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ApiError> {
    Ok(http::parse_request(bytes)?)
}
