//! Issue: a guest hypervisor that throws malformed, out-of-range and
//! out-of-role hypercalls at L0 must get a clean refusal for each, must not
//! be able to crash or wedge L0, and must not disturb a well-behaved host VM
//! running next to it in the same process.
//!
//! The hostile guest (`guests/hostile`) checks every status itself and
//! prints one line per case; these tests read its console.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::vmm::Vmm;

/// Console of the hostile host VM line "hostile", generation 1.
const HOSTILE_CONSOLE: &str = "hostile-g1";

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIP: /dev/kvm not available");
        false
    }
}

/// A VMM whose guest hypervisor is the hostile one, with no nested guests.
fn hostile_vmm(dir: &Path) -> Vmm {
    let config = VmmConfig {
        nested: 0,
        console_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let images = vmbeam::images(Some(vmbeam::HOSTILE_ELF.to_vec())).unwrap();
    Vmm::new(config, images).unwrap()
}

/// Waits for the hostile guest's `done` line, failing early if its host VM fails.
fn wait_done(vmm: &Vmm, dir: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = common::console(dir, HOSTILE_CONSOLE);
        if text.lines().any(|l| l.starts_with("hostile: done")) {
            return text;
        }
        if let Some(f) = vmm.failure() {
            panic!("the hostile host VM failed: {f}\nits console:\n{text}");
        }
        if Instant::now() >= deadline {
            panic!("the hostile guest did not finish in {timeout:?}; its console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks the hostile guest's report and that L0 survived it intact.
fn check_report(vmm: &Vmm, text: &str) {
    for l in text.lines() {
        println!("[hostile-g1] {l}");
    }
    let unexpected: Vec<&str> = text.lines().filter(|l| l.contains("UNEXPECTED")).collect();
    assert!(
        unexpected.is_empty(),
        "L0 gave unexpected answers:\n{}",
        unexpected.join("\n")
    );
    let done = text
        .lines()
        .find(|l| l.starts_with("hostile: done"))
        .expect("done line");
    let words: Vec<&str> = done.split_whitespace().collect();
    // "hostile: done {n_ok} ok {n_bad} unexpected"
    assert_eq!(words.len(), 6, "{done}");
    assert_eq!(
        (words[3], words[4], words[5]),
        ("ok", "0", "unexpected"),
        "{done}"
    );
    let n_ok: usize = words[2].parse().expect("count of passed cases");
    let ok_lines = text
        .lines()
        .filter(|l| l.starts_with("hostile: ") && l.ends_with(" ok"))
        .count();
    assert_eq!(n_ok, ok_lines, "the done line must count every case line");
    assert!(n_ok >= 60, "too few cases ran: {done}");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    let hv = st
        .host_vms
        .iter()
        .find(|h| h.name == "hostile")
        .expect("hostile host VM in status");
    assert_eq!(hv.status, "running", "{hv:?}");
    // Everything the guest created it destroyed again; L0 kept nothing.
    assert!(hv.nested.is_empty(), "{:?}", hv.nested);
}

/// Console lines of nested guests l2-0 and l2-1 of the first host VM.
fn nested_lines(vmm: &Vmm) -> (u64, u64) {
    let st = vmm.status();
    let lines = |name: &str| {
        st.host_vms
            .first()
            .and_then(|h| h.nested.iter().find(|n| n.name == name))
            .map(|n| n.console_lines)
            .unwrap_or(0)
    };
    (lines("l2-0"), lines("l2-1"))
}

/// Waits until both nested guests of `vmm` printed more than `than`.
fn wait_progress(vmm: &Vmm, than: (u64, u64), what: &str) -> (u64, u64) {
    let timeout = Duration::from_secs(120);
    let deadline = Instant::now() + timeout;
    loop {
        let now = nested_lines(vmm);
        if now.0 > than.0 && now.1 > than.1 {
            return now;
        }
        if let Some(f) = vmm.failure() {
            panic!("the normal host VM failed {what}: {f}");
        }
        if Instant::now() >= deadline {
            panic!(
                "the normal VM's nested guests stopped printing {what}: lines {now:?}, \
                 before {than:?}, after {timeout:?}; status {:?}",
                vmm.status()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hostile_hypercalls_are_refused() {
    if !kvm_present() {
        return;
    }
    let dir = common::temp_dir("hostile-alone");
    let vmm = hostile_vmm(&dir);
    vmm.start("hostile").unwrap();
    let text = wait_done(&vmm, &dir, Duration::from_secs(60));
    check_report(&vmm, &text);
    // It keeps idling in OP_WAIT: still running a little later.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vmm.failure(), None);
    assert_eq!(vmm.status().host_vms[0].status, "running");
}

#[test]
fn hostile_guest_does_not_disturb_a_neighbour() {
    if !kvm_present() {
        return;
    }
    let ndir = common::temp_dir("hostile-neighbour-normal");
    let hdir = common::temp_dir("hostile-neighbour-hostile");
    let normal = common::vmm(&ndir, VmmConfig::default());
    normal.start("normal").unwrap();
    let before = wait_progress(&normal, (0, 0), "at start");

    let hostile = hostile_vmm(&hdir);
    hostile.start("hostile").unwrap();
    let text = wait_done(&hostile, &hdir, Duration::from_secs(120));
    let at_done = nested_lines(&normal);
    println!(
        "normal nested console lines: {before:?} at hostile start, {at_done:?} at hostile done"
    );
    check_report(&hostile, &text);
    assert_eq!(normal.failure(), None);

    // The neighbour keeps printing while the hostile VM is still up...
    let during = wait_progress(&normal, at_done, "while the hostile VM runs");
    assert!(during.0 > before.0 && during.1 > before.1);
    assert_eq!(hostile.failure(), None);
    assert_eq!(hostile.status().host_vms[0].status, "running");

    // ...and after it is gone.
    drop(hostile);
    let gone = nested_lines(&normal);
    wait_progress(&normal, gone, "after the hostile VM stopped");
    assert_eq!(normal.failure(), None);
    let st = normal.status();
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), 2);
    assert!(
        st.host_vms[0].nested.iter().all(|n| n.state != "crashed"),
        "{:?}",
        st.host_vms[0].nested
    );
}
