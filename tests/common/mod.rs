//! Helpers shared by the integration tests: skipping (or, with
//! `VMBEAM_REQUIRE_KVM=1`, failing) without /dev/kvm, temporary console
//! directories, and waiting for console output.
#![allow(dead_code)]

mod kvm;
pub mod moves;
pub mod netns;
pub mod procfs;
pub mod server;
pub use kvm::kvm_or_skip;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::vmm::Vmm;

/// A fresh directory for one test's consoles, removed when the guard drops.
/// A failing test keeps it (its path is printed) so the consoles can be read.
pub fn temp_dir(test: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("vmbeam-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A test's scratch directory: a path that removes itself on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A VMM with consoles in `dir` and the embedded images.
pub fn vmm(dir: &Path, config: VmmConfig) -> Vmm {
    let config = VmmConfig {
        console_dir: Some(dir.to_path_buf()),
        ..config
    };
    Vmm::new(config, vmbeam::images(None).unwrap()).unwrap()
}

/// A VMM with consoles and events (`events.jsonl`) in a fresh directory,
/// running host VM line `line` with `nested` guests (memtouch and ticker in
/// turn), returned once every guest has printed three lines (each within
/// `boot`).
pub fn started_with_events(test: &str, line: &str, nested: u32, boot: Duration) -> (Vmm, TempDir) {
    let dir = temp_dir(test);
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested,
            workloads: vec![
                vmbeam_vmm::config::Workload::Memtouch,
                vmbeam_vmm::config::Workload::Ticker,
            ],
            ..Default::default()
        },
    );
    vmm.set_event_log(
        vmbeam_vmm::control::events::EventLog::open(&dir.join("events.jsonl")).unwrap(),
    );
    vmm.start(line).unwrap();
    for i in 0..nested {
        wait_console(&dir, &format!("l2-{i}"), boot, |t| t.lines().count() >= 3);
    }
    (vmm, dir)
}

/// The text of console `name` in `dir`: a nested guest's (`l2-0`, file
/// `l2-0.log`) or one generation of a host VM line's (`hv0/g2`: the lines
/// tagged `[g2] ` in `hv0.l1.log`, without the tag).
pub fn console(dir: &Path, name: &str) -> String {
    match name.split_once('/') {
        Some((line, generation)) => {
            let text =
                std::fs::read_to_string(dir.join(format!("{line}.l1.log"))).unwrap_or_default();
            let tag = format!("[{generation}] ");
            text.lines()
                .filter_map(|l| l.strip_prefix(&tag))
                .fold(String::new(), |mut out, l| {
                    out.push_str(l);
                    out.push('\n');
                    out
                })
        }
        None => std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default(),
    }
}

/// Waits until `pred` holds on console `name`, failing with its contents after `timeout`.
pub fn wait_console(
    dir: &Path,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console(dir, name);
        if pred(&text) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!("console {name} did not show what was expected in {timeout:?}; it has:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Last number after `key=` (or `key `) on the console, e.g. the ticker count.
pub fn last_counter(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
}

/// memtouch's last completed round on console `text`.
pub fn memtouch_round(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("round="))
            .and_then(|n| n.parse().ok())
    })
}

/// Progress of nested guest `i` as the tests lay guests out: memtouch's
/// round for even guests, ticker's count for odd ones.
pub fn guest_progress(text: &str, i: u32) -> Option<u64> {
    if i.is_multiple_of(2) {
        memtouch_round(text)
    } else {
        last_counter(text, "tick ")
    }
}

/// Progress of guests `l2-0` .. `l2-{n-1}` (0 where none is printed yet).
pub fn progress(dir: &Path, n: u32) -> Vec<u64> {
    (0..n)
        .map(|i| guest_progress(&console(dir, &format!("l2-{i}")), i).unwrap_or(0))
        .collect()
}

/// Waits until guest `l2-{i}` has progressed beyond `base`; returns its console.
pub fn wait_beyond(dir: &Path, i: u32, base: u64) -> String {
    wait_console(dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
        guest_progress(t, i).is_some_and(|v| v > base)
    })
}

/// Every `bad=N` count memtouch printed on `text`, parsed as a number
/// (memtouch's count of corrupted words it sampled, cumulative per guest).
/// Panics on a `bad=` that is not followed by a number.
pub fn memtouch_bad_counts(text: &str) -> Vec<u64> {
    text.lines()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("bad="))
        .map(|n| {
            n.parse().unwrap_or_else(|_| {
                panic!("memtouch printed a bad count that is no number: bad={n}")
            })
        })
        .collect()
}

/// Asserts that memtouch console `name` in `dir` reported at least one
/// round and never a corrupted word (every `bad=N` has N = 0); `when`
/// says at which point of the test, for the message.
pub fn assert_memtouch_clean(dir: &Path, name: &str, when: &str) {
    let text = console(dir, name);
    let counts = memtouch_bad_counts(&text);
    assert!(
        !counts.is_empty(),
        "memtouch {name} reported no round {when}; its console:\n{text}"
    );
    let worst = counts.iter().max().copied().unwrap_or(0);
    assert_eq!(
        worst, 0,
        "memtouch {name} saw {worst} corrupted words {when}; its console:\n{text}"
    );
}

/// Waits until `pred` holds, checking every 10 ms; fails naming `what`
/// after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
