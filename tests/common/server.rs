//! A `vmbeam run` child serving the API on a Unix socket, for the tests that
//! drive the binary end to end; killed on drop so a failing test leaves no
//! server behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmbeam_vmm::api;

/// A running `vmbeam run` child, killed on drop if it is still running.
pub struct Run(pub Child);

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `vmbeam run --console-dir DIR --api-sock SOCK EXTRA…` and waits
/// until nested guests `l2-0` .. `l2-{guests-1}` have printed two lines.
pub fn start_run(dir: &Path, sock: &Path, extra: &[&str], guests: u32) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_vmbeam"))
        .args(["run", "--duration", "600", "--console-dir"])
        .arg(dir)
        .arg("--api-sock")
        .arg(sock)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = Run(child);
    for i in 0..guests {
        super::wait_console(dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
            t.lines().count() >= 2
        });
    }
    run
}

/// One API call that must get an answer: its status code and body.
pub fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    api::call(sock, method, path, body).unwrap()
}
