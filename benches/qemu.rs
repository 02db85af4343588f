//! The outside reference of the migration benchmark: QEMU's own local
//! migration of a paused VM whose RAM is a shared file-backed memory
//! backend filled with the same pattern, once normally (every page is sent)
//! and once with the `x-ignore-shared` capability (the shared RAM is not
//! sent; QEMU's closest feature to zero-copy), and for `remote.rs` with
//! `postcopy-ram` (QEMU's post-copy: `migrate-start-postcopy` right after
//! `migrate`). Used only where `qemu-system-x86_64` is installed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One QEMU migration.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// `normal`, `x-ignore-shared` or `postcopy-ram`.
    pub variant: &'static str,
    /// Wall time from `migrate` to completion, ms.
    pub total_ms: f64,
    /// Wall time from `migrate` to the switch (status `postcopy-active`
    /// first seen; without post-copy, or if QEMU finished by pre-copy
    /// first, the completion), ms.
    pub resume_ms: f64,
    /// The migration went through `postcopy-active`.
    pub switched: bool,
    /// QEMU's reported downtime, ms.
    pub downtime_ms: f64,
    /// RAM bytes QEMU sent.
    pub transferred: u64,
    /// CPU time of both QEMU processes during the migration, ms.
    pub cpu_ms: f64,
}

/// Path of qemu-system-x86_64, if installed.
pub fn qemu() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.exists())
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        q.line(); // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or(serde_json::Value::Null)
    }

    /// Sends a command, returns its `return` (events are skipped).
    fn cmd(&mut self, c: &str) -> serde_json::Value {
        writeln!(self.w, "{c}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {c}: {e}");
            }
            if v.is_null() {
                panic!("QMP connection closed on {c}");
            }
        }
    }
}

fn cpu_of(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = 100.0; // USER_HZ
    let u: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let k: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (u + k) / tick * 1000.0
}

fn start(q: &Path, dir: &Path, name: &str, size: u64, file: &Path, incoming: bool) -> (Child, Qmp) {
    let qmp = dir.join(format!("{name}.qmp"));
    let mut c = Command::new(q);
    c.args([
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-S",
    ])
    .arg("-m")
    .arg(format!("{}M", size >> 20))
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=mem,size={},mem-path={},share=on",
        size,
        file.display()
    ))
    .args(["-machine", "memory-backend=mem"])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    let child = c.spawn().expect("start qemu-system-x86_64");
    let m = Qmp::connect(&qmp);
    (child, m)
}

/// Migrates a paused QEMU VM of `size` bytes (RAM file filled by `fill`)
/// locally over a Unix socket, normally and with x-ignore-shared.
pub fn measure(size: u64, fill: &dyn Fn(&Path, u64)) -> Vec<QemuRun> {
    measure_variants(size, fill, &["normal", "x-ignore-shared"])
}

/// [`measure`] for the given variants (`normal`, `x-ignore-shared`,
/// `postcopy-ram`).
pub fn measure_variants(
    size: u64,
    fill: &dyn Fn(&Path, u64),
    variants: &[&'static str],
) -> Vec<QemuRun> {
    let Some(q) = qemu() else { return Vec::new() };
    let dir = std::env::temp_dir().join(format!("vmbeam-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shm = PathBuf::from("/dev/shm").join(format!("vmbeam-qemu-{}", std::process::id()));
    let src_ram = shm.with_extension("src");
    let dst_ram = shm.with_extension("dst");
    fill(&src_ram, size);
    let mut out = Vec::new();
    for &variant in variants {
        let shared = variant == "x-ignore-shared";
        let postcopy = variant == "postcopy-ram";
        // With x-ignore-shared both sides use the same file, as in a local
        // update of QEMU itself; normally the destination has its own RAM.
        let dst_file = if shared {
            src_ram.clone()
        } else {
            dst_ram.clone()
        };
        let (mut s, mut sq) = start(&q, &dir, "src", size, &src_ram, false);
        let (mut d, mut dq) = start(&q, &dir, "dst", size, &dst_file, true);
        let caps = format!(
            r#"{{"execute":"migrate-set-capabilities","arguments":{{"capabilities":[{{"capability":"x-ignore-shared","state":{shared}}},{{"capability":"postcopy-ram","state":{postcopy}}}]}}}}"#
        );
        sq.cmd(&caps);
        dq.cmd(&caps);
        let mig = dir.join("mig.sock");
        let _ = std::fs::remove_file(&mig);
        dq.cmd(&format!(
            r#"{{"execute":"migrate-incoming","arguments":{{"uri":"unix:{}"}}}}"#,
            mig.display()
        ));
        let cpu0 = cpu_of(s.id()) + cpu_of(d.id());
        let t = Instant::now();
        sq.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
            mig.display()
        ));
        if postcopy {
            sq.cmd(r#"{"execute":"migrate-start-postcopy"}"#);
        }
        let mut resumed = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        let info = loop {
            assert!(
                Instant::now() < deadline,
                "QEMU migration {variant} took over 600 s"
            );
            let v = sq.cmd(r#"{"execute":"query-migrate"}"#);
            match v.get("status").and_then(|s| s.as_str()) {
                Some("postcopy-active") if resumed.is_none() => resumed = Some(t.elapsed()),
                Some("completed") => break v,
                Some("failed") | Some("cancelled") => panic!("QEMU migration {variant}: {v}"),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let total_ms = t.elapsed().as_secs_f64() * 1000.0;
        let cpu_ms = cpu_of(s.id()) + cpu_of(d.id()) - cpu0;
        out.push(QemuRun {
            variant,
            total_ms,
            resume_ms: resumed
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(total_ms),
            switched: resumed.is_some(),
            downtime_ms: info.get("downtime").and_then(|x| x.as_f64()).unwrap_or(0.0),
            transferred: info
                .get("ram")
                .and_then(|r| r.get("transferred"))
                .and_then(|x| x.as_u64())
                .unwrap_or(0),
            cpu_ms,
        });
        let _ = s.kill();
        let _ = d.kill();
        let _ = s.wait();
        let _ = d.wait();
    }
    let _ = std::fs::remove_file(&src_ram);
    let _ = std::fs::remove_file(&dst_ram);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
