//! A guest hypervisor that pushes L0 to its bounds from every vCPU (the
//! test-only `guests/stress`) gets a clear status for every refusal and
//! cannot exhaust L0: records and consoles of destroyed guests are
//! released, the nested-VM bound holds, VM_MAP and VM_CREATE races have
//! one winner, console floods are cut to the rate, `status` never waits
//! behind a nested RUN, INJECT_IRQ waits until the guest can take it, and a
//! healthy host VM beside all of it keeps running and
//! can be rejuvenated (`tests/neighbour.rs`).

mod common;
mod stresskit;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stresskit::*;
use vmbeam_abi::boot::stress;
use vmbeam_vmm::config::VmmConfig;

#[test]
fn status_never_waits_behind_a_nested_run() {
    if !common::kvm_or_skip("status_never_waits_behind_a_nested_run") {
        return;
    }
    let dir = common::temp_dir("bounds-spin");
    let v = vmm(&dir, 4, 0);
    start_stress(&v, stress::SPIN);
    for i in 0..4 {
        wait_stress(
            &v,
            &dir,
            &format!("spin{i}: running"),
            Duration::from_secs(60),
        );
    }
    let mut runs_before = 0;
    for round in 0..4 {
        // Every vCPU is inside a 1 s RUN of a guest that never exits.
        let (st, took) = status_within(&v, Duration::from_secs(2));
        println!("status {round} answered in {took:?}");
        let st = st.expect("status did not answer within 2 s");
        let hv = line(&st, "stress");
        assert_eq!(hv.nested.len(), 4, "{:?}", hv.nested);
        assert!(hv
            .nested
            .iter()
            .all(|n| n.vcpus == 1 && n.name.starts_with("spin")));
        let runs: u64 = hv.nested.iter().map(|n| n.runs).sum();
        assert!(runs >= runs_before);
        runs_before = runs;
        std::thread::sleep(Duration::from_millis(300));
    }
    // The spinning guests' RUNs do complete (each at the end of its slice;
    // on a loaded host that can take longer than the rounds above).
    common::wait_until(Duration::from_secs(60), "a completed nested RUN", || {
        let st = v.status();
        line(&st, "stress")
            .nested
            .iter()
            .map(|n| n.runs)
            .sum::<u64>()
            > 0
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn map_and_create_races_have_one_winner() {
    if !common::kvm_or_skip("map_and_create_races_have_one_winner") {
        return;
    }
    let dir = common::temp_dir("bounds-race");
    let v = vmm(&dir, 4, 0);
    start_stress(&v, stress::RACE);
    let done = wait_stress(&v, &dir, "race done", Duration::from_secs(120));
    println!("{done}");
    assert!(
        done.ends_with("on 4 vCPUs, most map winners 1, most name winners 1"),
        "{done}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_console_flood_is_cut_to_the_rate() {
    if !common::kvm_or_skip("a_console_flood_is_cut_to_the_rate") {
        return;
    }
    let dir = common::temp_dir("bounds-flood");
    let v = vmm(&dir, 2, 0);
    let t0 = Instant::now();
    start_stress(&v, stress::FLOOD);
    let l = wait_stress(&v, &dir, "flood: 4096 lines", Duration::from_secs(120));
    let refused: u64 = l
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(refused > 0, "{l}");
    let size = std::fs::metadata(dir.join("flood0.log")).unwrap().len();
    let elapsed = t0.elapsed();
    println!("{l}: {size} bytes kept in {elapsed:?}");
    let rate = vmbeam_vmm::host::console::CONSOLE_RATE;
    let allowed = vmbeam_vmm::host::console::CONSOLE_BURST
        + (elapsed.as_secs_f64() * rate as f64) as u64
        + 4096;
    assert!(
        size <= allowed,
        "console file {size} bytes, at most {allowed}"
    );
    let st = v.status();
    let g = &line(&st, "stress").nested[0];
    assert_eq!(g.name, "flood0");
    assert!(g.console_dropped_bytes > 0, "{g:?}");
    assert!(limit_event(&dir, "console_rate"), "{:?}", events(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inject_irq_waits_for_the_guest_to_take_it() {
    if !common::kvm_or_skip("inject_irq_waits_for_the_guest_to_take_it") {
        return;
    }
    let dir = common::temp_dir("bounds-irq");
    let v = vmm(&dir, 1, 0);
    start_stress(&v, stress::IRQ);
    let l = wait_stress(&v, &dir, "irq: counted", Duration::from_secs(60));
    println!("{l}");
    assert!(
        l.ends_with(
            "counted 0 with interrupts off, 1 once they were on, 2 after an injection with them on ok"
        ),
        "{l}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fresh_names_leave_no_records_or_files_behind() {
    if !common::kvm_or_skip("fresh_names_leave_no_records_or_files_behind") {
        return;
    }
    let dir = common::temp_dir("bounds-churn");
    let v = vmm(&dir, 1, 0);
    start_stress(&v, stress::CHURN);
    let bound = wait_stress(&v, &dir, "bound:", Duration::from_secs(60));
    let want = format!(
        "bound: {} nested VMs, then Err(TooMany)",
        vmbeam_abi::boot::MAX_NESTED
    );
    assert!(bound.ends_with(&want), "{bound}");
    let before = footprint();
    let t0 = Instant::now();
    let done = wait_stress(&v, &dir, "churn done", Duration::from_secs(180));
    let after = footprint();
    println!("{done} in {:?}; {before:?} -> {after:?}", t0.elapsed());
    assert!(done.ends_with("10000 names, 0 failed calls"), "{done}");
    // Every destroyed guest's record and console went with it: at most
    // the one being cycled right now is alive (its console file is open).
    let live = v.shared.live_records();
    assert!(
        live <= 1,
        "{live} records alive after 10000 destroyed guests"
    );
    assert!(
        after.fds <= before.fds + 16,
        "fds {} -> {}",
        before.fds,
        after.fds
    );
    let st = v.status();
    let hv = line(&st, "stress");
    assert!(
        hv.limits.get("nested_vms").copied().unwrap_or(0) >= 1,
        "{:?}",
        hv.limits
    );
    assert!(limit_event(&dir, "nested_vms"), "{:?}", events(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `GET /status` on `s` and reads the status code, with a deadline.
fn get_status_on(mut s: std::os::unix::net::UnixStream) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head).to_string();
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(text))
}

/// The child half of the test below: runs with a descriptor limit of its
/// own, so the rest of the test binary is not affected.
fn out_of_descriptors_child(dir: &Path) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let v = Arc::new(common::vmm(dir, VmmConfig::default()));
    let sock = dir.join("api.sock");
    let server = Arc::new(vmbeam_vmm::api::ApiServer::bind(&sock).unwrap());
    let serving = Arc::new(AtomicBool::new(false));
    let (s2, v2, on) = (server.clone(), v.clone(), serving.clone());
    std::thread::spawn(move || loop {
        if on.load(Ordering::SeqCst) {
            s2.accept_all_threaded(&v2);
        }
        std::thread::sleep(Duration::from_millis(5));
    });
    // The client connects first (the connection waits in the backlog),
    // then every descriptor is taken, then the server looks.
    let client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let open = footprint().fds as u64;
    let lim = libc::rlimit {
        rlim_cur: open + 16,
        rlim_max: open + 16,
    };
    // SAFETY: setrlimit with a valid pointer to a local rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut fill = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fill.push(f);
    }
    serving.store(true, Ordering::SeqCst);
    let first = get_status_on(client);
    // Descriptors come back: the API serves normally again (within a
    // deadline, as the server may still be backing off).
    drop(fill);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let then = loop {
        let r = std::os::unix::net::UnixStream::connect(&sock).and_then(get_status_on);
        if matches!(r, Ok(200)) || std::time::Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("out of descriptors: {first:?}, then {then:?}");
    assert_eq!(first.unwrap(), 503);
    assert_eq!(then.unwrap(), 200);
}

#[test]
fn the_api_answers_when_l0_is_out_of_descriptors() {
    if !common::kvm_or_skip("the_api_answers_when_l0_is_out_of_descriptors") {
        return;
    }
    if let Some(dir) = std::env::var_os("VMBEAM_FD_CHILD") {
        out_of_descriptors_child(Path::new(&dir));
        return;
    }
    let dir = common::temp_dir("bounds-fds");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_api_answers_when_l0_is_out_of_descriptors",
            "--nocapture",
        ])
        .env("VMBEAM_FD_CHILD", &dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("out of descriptors: Ok(503), then Ok(200)"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The memory slots (file, offset, length) of nested guest `name` of the
/// host VM serving line `line` now.
fn slots_of(
    v: &vmbeam_vmm::vmm::Vmm,
    line: &str,
    name: &str,
) -> Vec<(Arc<vmbeam_vmm::host::memory::MemFile>, u64, u64)> {
    let vm = v.current(Some(line)).unwrap();
    let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    for n in vms {
        let n = n.lock().unwrap();
        if n.name == name {
            return n
                .slots
                .iter()
                .map(|s| (s.file.clone(), s.file_offset, s.len))
                .collect();
        }
    }
    Vec::new()
}

fn data_bytes(slots: &[(Arc<vmbeam_vmm::host::memory::MemFile>, u64, u64)]) -> u64 {
    slots
        .iter()
        .flat_map(|(f, off, len)| f.extents(*off, *len))
        .filter(|e| e.2)
        .map(|e| e.1)
        .sum()
}

#[test]
fn a_moved_guest_counts_as_used_and_returns_its_pages_when_destroyed() {
    if !common::kvm_or_skip("a_moved_guest_counts_as_used_and_returns_its_pages_when_destroyed") {
        return;
    }
    let dir = common::temp_dir("bounds-punch");
    // l2-0 memtouch (forever: its rounds are many), l2-1 ticker that
    // faults after 250 ticks (about 5 s), so its guest hypervisor destroys
    // it after two moves.
    let config = VmmConfig {
        nested: 2,
        workload_param: 250,
        ..Default::default()
    };
    let v = common::vmm(&dir, config);
    v.start("hv0").unwrap();
    assert!(v.wait_healthy(Duration::from_secs(60)));
    for gen in 2..=3 {
        let r = v.rejuvenate(None, &Default::default()).unwrap();
        assert_eq!(r.to_generation, gen);
    }
    // The successor counts the memory of the guests it adopted (in its
    // grant window, not its pool) as used.
    let deadline = Instant::now() + Duration::from_secs(30);
    let used = loop {
        let st = v.status();
        let hv = line(&st, "hv0");
        if hv.generation == 3 && hv.health_reports > 0 {
            break hv.health["pool_used_bytes"];
        }
        assert!(
            Instant::now() < deadline,
            "generation 3 never reported health"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let aboard: u64 = line(&v.status(), "hv0")
        .nested
        .iter()
        .map(|n| n.mem_bytes)
        .sum();
    println!("generation 3 reports {used} bytes used with {aboard} bytes of guests aboard");
    assert!(aboard > 0 && used >= aboard, "{used} used, {aboard} aboard");
    let slots = slots_of(&v, "hv0", "l2-1");
    assert!(!slots.is_empty(), "l2-1 was destroyed before its moves");
    // Its pages live in generation 1's pool, mapped into generation 3.
    assert!(
        slots.iter().all(|(f, _, _)| f.name.contains("g1-pool")),
        "{:?}",
        slots.iter().map(|s| &s.0.name).collect::<Vec<_>>()
    );
    let before = data_bytes(&slots);
    assert!(before > 0);
    let siblings = slots_of(&v, "hv0", "l2-0");
    let sibling_before = data_bytes(&siblings);
    common::wait_console(&dir, "hv0/g3", Duration::from_secs(60), |t| {
        t.contains("nested guest l2-1 crashed")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !slots_of(&v, "hv0", "l2-1").is_empty() {
        assert!(Instant::now() < deadline, "l2-1 was not destroyed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = data_bytes(&slots);
    println!("l2-1: {before} bytes of pages before, {after} after; sibling {sibling_before}");
    assert_eq!(
        after, 0,
        "the destroyed guest's pages stay in generation 1's pool"
    );
    // The sibling from the same memfd is untouched and keeps running.
    assert!(data_bytes(&siblings) >= sibling_before);
    let base = common::progress(&dir, 1);
    common::wait_beyond(&dir, 0, base[0]);
    let _ = std::fs::remove_dir_all(&dir);
}
