//! Whether a test on real /dev/kvm runs, skips, or fails: one decision
//! shared by the integration tests and the benchmarks.
//!
//! Without KVM a test prints `SKIP` with the reason and passes. With
//! `VMBEAM_REQUIRE_KVM=1` (CI on a machine that has KVM) the same reason
//! fails the test instead, so a KVM that silently went missing cannot turn
//! the suite into a row of passes.

/// Why /dev/kvm cannot be used here, or `None` when it can: it must open,
/// answer `KVM_GET_API_VERSION` with 12 and create a VM.
pub fn kvm_unusable() -> Option<String> {
    let kvm = match vmbeam_vmm::l1::shared::open_kvm() {
        Ok(k) => k,
        Err(e) => return Some(e.to_string()),
    };
    match kvm.get_api_version() {
        12 => {}
        v if v < 0 => {
            let e = std::io::Error::last_os_error();
            return Some(format!(
                "/dev/kvm does not answer KVM_GET_API_VERSION ({e})"
            ));
        }
        v => return Some(format!("/dev/kvm reports KVM API version {v}, not 12")),
    }
    match kvm.create_vm() {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot create a VM ({e})")),
    }
}

/// True when `VMBEAM_REQUIRE_KVM` is set to anything but empty or `0`.
pub fn kvm_required() -> bool {
    std::env::var("VMBEAM_REQUIRE_KVM").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// True if `what` (a test or benchmark name) can use KVM. Otherwise prints
/// `SKIP {what}: {reason}` and returns false, or, with
/// `VMBEAM_REQUIRE_KVM=1`, panics with the reason.
pub fn kvm_or_skip(what: &str) -> bool {
    match kvm_unusable() {
        None => true,
        Some(reason) if kvm_required() => {
            panic!("{what}: VMBEAM_REQUIRE_KVM=1 but KVM is unusable: {reason}")
        }
        Some(reason) => {
            println!("SKIP {what}: {reason}");
            false
        }
    }
}
