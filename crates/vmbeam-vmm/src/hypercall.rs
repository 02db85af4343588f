//! Executes the hypercalls a guest hypervisor issues.
//!
//! Every argument comes from a guest we do not trust: each op checks
//! handles, ranges (overflow, alignment, ownership), counts and roles, and
//! answers with a [`Status`] instead of failing. Nothing here panics on guest
//! input, and an error leaves L0's state as it was.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE};

use crate::handover;
use crate::hostvm::HostVm;
use crate::kick::SliceTimer;
use crate::memory::RegionKind;
use crate::nested::{NestedSlot, NestedVm};

/// What the vCPU loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum HcOutcome {
    /// Resume L1.
    Continue,
    /// L1 handed everything over; end this vCPU thread.
    Retire,
}

/// Result of one op.
pub type HcResult = Result<HcOutcome, Status>;

const OK: HcResult = Ok(HcOutcome::Continue);

/// Reads the hypercall page of `vcpu`, runs `op`, writes the answer back.
pub fn dispatch(vm: &HostVm, vcpu: u32, op: u32, timer: &SliceTimer) -> HcOutcome {
    vm.hypercalls.fetch_add(1, Ordering::Relaxed);
    let gpa = layout::hypercall_page(vcpu);
    let mut raw = [0u8; std::mem::size_of::<HypercallPage>()];
    if !vm.mem.read().unwrap().read(gpa, &mut raw) {
        return HcOutcome::Continue;
    }
    let mut page: HypercallPage = vmbeam_abi::from_bytes(&raw).expect("page-sized buffer");
    let res = run_op(vm, op, &mut page, timer);
    let outcome = match res {
        Ok(o) => {
            page.status = Status::Ok as i32;
            o
        }
        Err(s) => {
            page.status = s as i32;
            HcOutcome::Continue
        }
    };
    page.op = op;
    vm.mem
        .read()
        .unwrap()
        .write(gpa, vmbeam_abi::as_bytes(&page));
    outcome
}

fn name_arg(page: &HypercallPage) -> Result<String, Status> {
    let mut b = [0u8; vmbeam_abi::NAME_LEN];
    b.copy_from_slice(&page.data[..vmbeam_abi::NAME_LEN]);
    let n = vmbeam_abi::name_from_bytes(&b).ok_or(Status::BadArg)?;
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(Status::BadArg);
    }
    Ok(n.to_string())
}

fn nested(vm: &HostVm, handle: u64) -> Result<Arc<Mutex<NestedVm>>, Status> {
    vm.nested_vm(handle).ok_or(Status::NoSuchHandle)
}

fn run_op(vm: &HostVm, op: u32, p: &mut HypercallPage, timer: &SliceTimer) -> HcResult {
    let a = p.args;
    match op {
        OP_PING => {
            p.ret[0] = vmbeam_abi::ABI_VERSION as u64;
            p.ret[1] = a[0] ^ PING_XOR;
            OK
        }
        OP_CONSOLE_WRITE => {
            let len = usize::try_from(a[1]).map_err(|_| Status::TooMany)?;
            if len > DATA_LEN {
                return Err(Status::TooMany);
            }
            let line = &p.data[..len];
            if a[0] == CONSOLE_SELF {
                vm.console().write_line(line);
            } else {
                let n = nested(vm, a[0])?;
                let n = n.lock().unwrap();
                let rec = n.record.as_ref().ok_or(Status::BadState)?;
                rec.console.write_line(line);
            }
            OK
        }
        OP_HEALTH => {
            let mut h = vm.health.lock().unwrap();
            h.counters = a;
            h.reports += 1;
            OK
        }
        OP_WAIT => {
            let us = a[0].clamp(1, 1_000_000);
            let seen = vm.doorbell.count();
            if !vm.stop.load(Ordering::SeqCst) {
                vm.doorbell.wait(seen, Duration::from_micros(us));
            }
            OK
        }
        OP_VM_CREATE => vm_create(vm, p),
        OP_VM_DESTROY => {
            let h = u32::try_from(a[0]).map_err(|_| Status::NoSuchHandle)?;
            let n = vm
                .nested
                .lock()
                .unwrap()
                .vms
                .remove(&h)
                .ok_or(Status::NoSuchHandle)?;
            let n = n.lock().unwrap();
            if let Some(r) = &n.record {
                let mut info = r.info.lock().unwrap();
                if info.bound_vm == vm.id {
                    info.bound_vm = 0;
                }
            }
            OK
        }
        OP_VM_MAP => vm_map(vm, a[0], a[1], a[2], a[3]),
        OP_VCPU_CREATE => {
            let n = nested(vm, a[0])?;
            let idx = n.lock().unwrap().create_vcpu(&vm.shared.cpuid)?;
            p.ret[0] = idx as u64;
            OK
        }
        OP_VCPU_GET_STATE => {
            let n = nested(vm, a[0])?;
            p.state = n.lock().unwrap().get_state(a[1], a[2])?;
            OK
        }
        OP_VCPU_SET_STATE => {
            let n = nested(vm, a[0])?;
            n.lock().unwrap().set_state(a[1], &p.state)?;
            OK
        }
        OP_VCPU_RUN => {
            let n = nested(vm, a[0])?;
            let mut n = n.lock().unwrap();
            let first = n.runs == 0;
            p.exit = n.run(a[1], Duration::from_micros(a[2]), a[3], timer)?;
            if first {
                handover::note_first_entry(vm, &n);
            }
            OK
        }
        OP_INJECT_IRQ => {
            let n = nested(vm, a[0])?;
            n.lock().unwrap().inject(a[1], a[2])?;
            OK
        }
        OP_FILL_PATTERN => {
            let n = nested(vm, a[0])?;
            n.lock().unwrap().fill_pattern(a[1], a[2], a[3])?;
            OK
        }
        OP_HANDOVER_READY => handover::op_ready(vm),
        OP_GRANT => handover::op_grant(vm, a[0], p),
        OP_NOTIFY => handover::op_notify(vm),
        OP_HANDOVER_DONE => handover::op_done(vm, a[0]),
        OP_HANDOVER_ABORT => handover::op_abort(vm, a[0]),
        _ => Err(Status::BadOp),
    }
}

fn vm_create(vm: &HostVm, p: &mut HypercallPage) -> HcResult {
    let name = name_arg(p)?;
    let mut table = vm.nested.lock().unwrap();
    if table.vms.len() >= vmbeam_abi::boot::MAX_NESTED {
        return Err(Status::TooMany);
    }
    if table.vms.values().any(|n| n.lock().unwrap().name == name) {
        return Err(Status::BadArg);
    }
    let successor = handover::is_successor_in_handover(vm);
    let record = if successor {
        None
    } else {
        let r = vm.shared.record(&name).map_err(|_| Status::Internal)?;
        {
            let info = r.info.lock().unwrap();
            if info.bound_vm != 0 && info.bound_vm != vm.id {
                // Another host VM runs a guest of this name.
                return Err(Status::NotPermitted);
            }
        }
        Some(r)
    };
    table.next_handle = table.next_handle.wrapping_add(1).max(1);
    while table.vms.contains_key(&table.next_handle) {
        table.next_handle = table.next_handle.wrapping_add(1).max(1);
    }
    let handle = table.next_handle;
    let mut n = NestedVm::new(&vm.shared.kvm, handle, &name)?;
    if let Some(r) = record {
        let mut info = r.info.lock().unwrap();
        info.bound_vm = vm.id;
        info.handle = handle;
        info.host_vm = vm.spec.line.clone();
        info.generation = vm.spec.generation;
        info.mem_bytes = 0;
        drop(info);
        n.record = Some(r);
    }
    table.vms.insert(handle, Arc::new(Mutex::new(n)));
    p.ret[0] = handle as u64;
    OK
}

fn vm_map(vm: &HostVm, handle: u64, l1_gpa: u64, l2_gpa: u64, len: u64) -> HcResult {
    if len == 0 {
        return Err(Status::BadArg);
    }
    if !l1_gpa.is_multiple_of(EXTENT_SIZE)
        || !l2_gpa.is_multiple_of(EXTENT_SIZE)
        || !len.is_multiple_of(EXTENT_SIZE)
    {
        return Err(Status::Misaligned);
    }
    let l1_end = l1_gpa.checked_add(len).ok_or(Status::OutOfRange)?;
    let n = nested(vm, handle)?;
    let (region_kind, file, offset, hva, map) = {
        let mem = vm.mem.read().unwrap();
        let r = mem.find(l1_gpa, len).ok_or(Status::OutOfRange)?;
        if !matches!(r.kind, RegionKind::Pool | RegionKind::Grant { .. }) {
            return Err(Status::OutOfRange);
        }
        (
            r.kind.clone(),
            r.file.clone(),
            r.offset + (l1_gpa - r.gpa),
            r.host_addr(l1_gpa) as usize,
            r.map.clone(),
        )
    };
    // No two nested VMs of this guest hypervisor may share memory.
    {
        let table = vm.nested.lock().unwrap();
        for (h, other) in table.vms.iter() {
            if *h as u64 == handle {
                continue;
            }
            let o = other.lock().unwrap();
            if o.slots
                .iter()
                .any(|s| l1_gpa < s.l1_gpa + s.len && s.l1_gpa < l1_end)
            {
                return Err(Status::Overlap);
            }
        }
    }
    let mut n = n.lock().unwrap();
    if n.slots
        .iter()
        .any(|s| l1_gpa < s.l1_gpa + s.len && s.l1_gpa < l1_end)
    {
        return Err(Status::Overlap);
    }
    if let RegionKind::Grant { guest } = &region_kind {
        handover::bind_adopted(vm, &mut n, guest)?;
    }
    n.map(NestedSlot {
        l2_gpa,
        l1_gpa,
        len,
        hva,
        file,
        file_offset: offset,
        map,
    })?;
    if let Some(r) = &n.record {
        r.info.lock().unwrap().mem_bytes = n.mem_bytes();
    }
    OK
}
