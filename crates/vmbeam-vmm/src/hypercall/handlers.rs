//! Executes the hypercalls a guest hypervisor issues: [`Handlers`] is the
//! dispatcher every host VM's vCPU loop is handed.
//!
//! Every argument comes from a guest we do not trust: each op checks
//! handles, ranges (overflow, alignment, ownership), counts and roles, and
//! answers with a [`Status`] instead of failing. Nothing here panics on guest
//! input, and an error leaves L0's state as it was.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE};

use crate::host::bounds::{Bound, MAX_NESTED_VMS};
use crate::host::kick::SliceTimer;
use crate::host::memory::RegionKind;
use crate::host::names::check_name;
use crate::l1::dispatch::{HcOutcome, HcResult, Hypercalls};
use crate::l1::hostvm::HostVm;
use crate::l1::shared::ClaimError;
use crate::migration::{batch, handover};
use crate::nesting::nested::{NestedCell, NestedRef, NestedSlot, NestedVm};

const OK: HcResult = Ok(HcOutcome::Continue);

/// The hypercall handlers, as the dispatcher host VMs are handed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Handlers;

impl Hypercalls<HostVm> for Handlers {
    fn dispatch(&self, vm: &HostVm, vcpu: u32, op: u32, timer: &SliceTimer) -> HcOutcome {
        dispatch(vm, vcpu, op, timer)
    }
}

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
    check_name(&b).map(str::to_string)
}

fn nested(vm: &HostVm, handle: u64) -> Result<NestedRef, Status> {
    vm.nested_vm(handle).ok_or(Status::NoSuchHandle)
}

fn run_op(vm: &HostVm, op: u32, p: &mut HypercallPage, timer: &SliceTimer) -> HcResult {
    let a = p.args;
    // Batch handover: a guest whose last exit the aged L1 has now handled
    // moves before this call is served.
    batch::aged_hook(vm, op);
    match op {
        OP_PING => {
            p.ret[0] = vmbeam_abi::ABI_VERSION as u64;
            p.ret[1] = a[0] ^ PING_XOR;
            OK
        }
        OP_CONSOLE_WRITE => {
            let line = &p.data[..console_len(a[1])?];
            let console = if a[0] == CONSOLE_SELF {
                vm.console()
            } else {
                // From the published summary: never waits for the guest's RUN.
                let n = nested(vm, a[0])?;
                let rec = n.summary().record.ok_or(Status::BadState)?;
                rec.console.clone()
            };
            if !console.write_line(line) {
                return Err(vm.refuse(Bound::ConsoleRate, "console line dropped"));
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
            if let Some(r) = handover::unadopt(vm, h) {
                // An adoption goes back to the aged guest hypervisor; the
                // successor's claims on its pages go with it.
                vm.nested.lock().unwrap().release_handle(h);
                return r.map(|_| HcOutcome::Continue);
            }
            let n = {
                let mut t = vm.nested.lock().unwrap();
                let n = t.vms.remove(&h).ok_or(Status::NoSuchHandle)?;
                t.release_handle(h);
                n
            };
            destroy(vm, n);
            OK
        }
        OP_VM_MAP => vm_map(vm, a[0], a[1], a[2], a[3]),
        OP_VCPU_CREATE => {
            let n = nested(vm, a[0])?;
            let idx = match handover::confirm_vcpu(vm, a[0] as u32) {
                Some(r) => r?,
                None => n
                    .lock()
                    .unwrap()
                    .create_vcpu(&vm.shared.cpuid)
                    .map_err(|s| match s {
                        Status::TooMany => vm.refuse(Bound::Vcpus, "nested vCPUs"),
                        Status::NoResources => vm.refuse(Bound::KvmObjects, "KVM_CREATE_VCPU"),
                        s => s,
                    })?,
            };
            p.ret[0] = idx as u64;
            OK
        }
        OP_VCPU_GET_STATE => {
            let n = nested(vm, a[0])?;
            let mut n = n.lock().unwrap();
            if n.frozen {
                // Reading completes a pending exit, which changes the state
                // of a guest that is on its way.
                return Err(Status::NotPermitted);
            }
            p.state = n.get_state(a[1], a[2])?;
            OK
        }
        OP_VCPU_SET_STATE => {
            let n = nested(vm, a[0])?;
            // An adopted VM keeps the state KVM holds: the successor's
            // SET_STATE only confirms it.
            if let Some(r) = handover::confirm_state(vm, a[0] as u32, a[1]) {
                return r.map(|_| HcOutcome::Continue);
            }
            let mut n = n.lock().unwrap();
            if n.frozen && !handover::is_successor_in_handover(vm) {
                // Granted away: the aged L1 no longer owns its state.
                return Err(Status::NotPermitted);
            }
            n.set_state(a[1], &p.state)?;
            let frozen = n.frozen;
            drop(n);
            if frozen && a[1] == 0 {
                handover::note_state_set(vm, a[0] as u32);
            }
            OK
        }
        OP_VCPU_RUN => {
            let gate = batch::run_gate(vm, u32::try_from(a[0]).map_err(|_| Status::NoSuchHandle)?)?;
            let n = nested(vm, a[0])?;
            let mut n = n.lock().unwrap();
            if !n.frozen && (a[1] as usize) < n.vcpu_count() {
                // The guest is entered now: this ends its downtime after a move.
                handover::note_first_entry(vm, &n);
            }
            let slice = match gate {
                batch::Gate::Free => Duration::from_micros(a[2]),
                batch::Gate::Capped(c) => Duration::from_micros(a[2]).min(c),
            };
            p.exit = n.run(a[1], slice, a[3], timer)?;
            OK
        }
        OP_INJECT_IRQ => {
            let n = nested(vm, a[0])?;
            n.lock().unwrap().inject(a[1], a[2])?;
            OK
        }
        OP_FILL_PATTERN => {
            let n = nested(vm, a[0])?;
            check_fill_args(a[1], a[2])?;
            let n = n.lock().unwrap();
            if n.frozen {
                // Granted away (aged L1) or adopted but not committed
                // (successor): its memory must reach the successor as the
                // guest left it, and a rollback must give it back intact.
                return Err(Status::NotPermitted);
            }
            n.fill_pattern(a[1], a[2], a[3])?;
            for (gpa, len) in n.l1_ranges(a[1], a[2]) {
                vm.note_l0_write(gpa, len);
            }
            OK
        }
        OP_DEVICE_QUERY => {
            let n = nested(vm, a[0])?;
            let n = n.lock().unwrap();
            let idx = u32::try_from(a[1]).map_err(|_| Status::NoSuchHandle)?;
            let bindings = vm.shared.bindings();
            let b = bindings
                .for_guest(&n.name)
                .get(idx as usize)
                .ok_or(Status::NoSuchHandle)?;
            p.ret[0] = b.device_type() as u64;
            if let Some((base, gsi)) = n.devices.placement(idx) {
                p.ret[1] = 1;
                p.ret[2] = base;
                p.ret[3] = gsi as u64;
            }
            OK
        }
        OP_DEVICE_PLACE => {
            let n = nested(vm, a[0])?;
            let mut n = n.lock().unwrap();
            if n.frozen {
                return Err(Status::NotPermitted);
            }
            if n.record.is_none() {
                return Err(Status::BadState);
            }
            let idx = u32::try_from(a[1]).map_err(|_| Status::NoSuchHandle)?;
            let gsi = u32::try_from(a[3]).map_err(|_| Status::BadArg)?;
            let bindings = vm.shared.bindings();
            let b = bindings
                .for_guest(&n.name)
                .get(idx as usize)
                .ok_or(Status::NoSuchHandle)?;
            p.ret[0] = n.place_device(idx, a[2], gsi, b).map_err(|e| {
                use crate::devices::DeviceError as E;
                match e {
                    E::Misaligned(_) => Status::Misaligned,
                    E::OutOfRange(_) => Status::OutOfRange,
                    E::Overlap(..) => Status::Overlap,
                    E::BadIrq(_) => Status::BadArg,
                    E::AlreadyPlaced(_) | E::TooLate => Status::BadState,
                    E::Kvm(_) => Status::NoResources,
                }
            })? as u64;
            OK
        }
        OP_HANDOVER_READY => handover::op_ready(vm),
        OP_GRANT => handover::op_grant(vm, a[0], p),
        OP_NOTIFY => handover::op_notify(vm),
        OP_HANDOVER_DONE => handover::op_done(vm, a[0]),
        OP_HANDOVER_ABORT => handover::op_abort(vm, a[0]),
        OP_OFFER => batch::op_offer(vm, a[0], a[1]),
        OP_OFFER_END => batch::op_offer_end(vm, a[0]),
        OP_ADOPT => batch::op_adopt(vm, a[0], p),
        _ => Err(Status::BadOp),
    }
}

/// The end of a nested guest its guest hypervisor destroyed: its record
/// is unbound (and goes with the last holder), its pages are returned to
/// the host in whichever memfd holds them (its own guest hypervisor's
/// pool, or the pool of the generation it was created in, after moves),
/// and a KVM VM that never had a vCPU is kept for reuse.
fn destroy(vm: &HostVm, n: NestedRef) {
    let punch = {
        let n = n.lock().unwrap();
        if let Some(r) = &n.record {
            let mut info = r.info.lock().unwrap();
            if info.bound_vm == vm.id {
                info.bound_vm = 0;
            }
        }
        // A frozen guest's pages are on their way to a successor: not ours
        // to release.
        if n.frozen {
            Vec::new()
        } else {
            n.slots
                .iter()
                .map(|s| (s.file.clone(), s.file_offset, s.len))
                .collect()
        }
    };
    for (file, offset, len) in punch {
        let _ = file.punch_hole(offset, len);
    }
    if let Some(kvm_vm) = NestedCell::into_vm(n).and_then(NestedVm::into_clean_vm) {
        drop(vm.keep_spare_vm(kvm_vm));
    }
}

fn vm_create(vm: &HostVm, p: &mut HypercallPage) -> HcResult {
    let name = name_arg(p)?;
    let successor = handover::is_successor_in_handover(vm);
    // Reserve the name and a handle under the table lock; build outside it.
    let handle = {
        let mut t = vm.nested.lock().unwrap();
        if t.count() >= MAX_NESTED_VMS {
            drop(t);
            return Err(vm.refuse(Bound::NestedVms, &format!("{MAX_NESTED_VMS} nested VMs")));
        }
        if t.has_name(&name) {
            return Err(Status::BadArg);
        }
        let h = t.alloc_handle();
        t.creating.push((name.clone(), h));
        h
    };
    let built = build_nested(vm, &name, handle, successor);
    let mut t = vm.nested.lock().unwrap();
    t.creating.retain(|(_, h)| *h != handle);
    let cell = built?;
    t.vms.insert(handle, cell);
    p.ret[0] = handle as u64;
    OK
}

/// The nested VM a VM_CREATE makes: in a successor during a handover, the
/// granted guest of that name itself (adopted); otherwise a new KVM VM
/// bound to a new record.
fn build_nested(
    vm: &HostVm,
    name: &str,
    handle: u32,
    successor: bool,
) -> Result<NestedRef, Status> {
    if successor {
        if let Some(adopted) = handover::try_adopt(vm, name, handle) {
            return Ok(adopted);
        }
    }
    let record = if successor {
        None
    } else {
        // A live guest of this name anywhere on the host (another host
        // VM's, or one being moved) keeps its name and console.
        match vm.shared.claim_record(name) {
            Ok(r) => Some(r),
            Err(ClaimError::Taken(_)) => return Err(Status::NotPermitted),
            Err(ClaimError::Console(e)) => {
                return Err(vm.refuse(Bound::Consoles, &e.to_string()));
            }
        }
    };
    let mut n = match vm.take_spare_vm() {
        Some(kvm_vm) => NestedVm::with_vm(kvm_vm, handle, name),
        None => NestedVm::new(&vm.shared.kvm, handle, name)
            .map_err(|_| vm.refuse(Bound::KvmObjects, "KVM_CREATE_VM"))?,
    };
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
    Ok(NestedCell::new(n))
}

fn vm_map(vm: &HostVm, handle: u64, l1_gpa: u64, l2_gpa: u64, len: u64) -> HcResult {
    let l1_end = check_map_args(l1_gpa, l2_gpa, len)?;
    let n = nested(vm, handle)?;
    let h = u32::try_from(handle).map_err(|_| Status::NoSuchHandle)?;
    let (region_kind, file, offset, hva, map) = {
        let mem = vm.mem.read().unwrap();
        let spans = mem.regions.iter().map(|r| (r.gpa, r.size, &r.kind));
        let r = &mem.regions[nested_memory_region(spans, l1_gpa, len)?];
        (
            r.kind.clone(),
            r.file.clone(),
            r.offset + (l1_gpa - r.gpa),
            r.host_addr(l1_gpa) as usize,
            r.map.clone(),
        )
    };
    // No two nested VMs of this guest hypervisor may share memory: the L1
    // range is claimed in the table first (one lock decides, so two vCPUs
    // cannot both win), then mapped; a failed map gives the claim back.
    {
        let mut t = vm.nested.lock().unwrap();
        if !t.vms.contains_key(&h) {
            return Err(Status::NoSuchHandle);
        }
        t.claim(h, l1_gpa, l1_end)?;
    }
    let res = if handover::is_adoption(vm, h) {
        // Adopting the aged guest hypervisor's VM: confirm, don't remap.
        let backing = (region_kind, file, offset);
        handover::confirm_slot(vm, h, &n, &backing, (l1_gpa, l2_gpa, len))
            .map(|_| HcOutcome::Continue)
    } else {
        map_claimed(
            vm,
            h,
            &n,
            (l1_gpa, l2_gpa, len),
            region_kind,
            file,
            offset,
            hva,
            map,
        )
    };
    if res.is_err() {
        vm.nested.lock().unwrap().release_claim(h, l1_gpa);
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn map_claimed(
    vm: &HostVm,
    h: u32,
    n: &NestedRef,
    (l1_gpa, l2_gpa, len): (u64, u64, u64),
    region_kind: RegionKind,
    file: std::sync::Arc<crate::host::memory::MemFile>,
    offset: u64,
    hva: usize,
    map: std::sync::Arc<vm_memory::MmapRegion>,
) -> HcResult {
    if let RegionKind::Grant { guest } = &region_kind {
        handover::bind_granted(vm, h, n, guest)?;
    }
    let mut n = n.lock().unwrap();
    n.map(NestedSlot {
        l2_gpa,
        l1_gpa,
        len,
        hva,
        file,
        file_offset: offset,
        map,
    })
    .map_err(|s| match s {
        Status::TooMany => vm.refuse(Bound::Slots, "nested memory slots"),
        s => s,
    })?;
    if let Some(r) = &n.record {
        r.info.lock().unwrap().mem_bytes = n.mem_bytes();
    }
    OK
}

// ---------------------------------------------------------------------------
// Pure argument checks.
//
// Everything below decides on guest-supplied numbers alone, without KVM or
// a host VM, so it can be unit-tested and fuzzed (`fuzz/`): the ops above
// call these functions first, at the point where they used to check inline.
// ---------------------------------------------------------------------------

/// Bytes of `data` a CONSOLE_WRITE may print: `args[1]`, at most [`DATA_LEN`].
pub fn console_len(arg: u64) -> Result<usize, Status> {
    match usize::try_from(arg) {
        Ok(n) if n <= DATA_LEN => Ok(n),
        _ => Err(Status::TooMany),
    }
}

/// True if the half-open ranges `[a, a_end)` and `[b, b_end)` share a byte.
pub fn ranges_overlap(a: u64, a_end: u64, b: u64, b_end: u64) -> bool {
    a < b_end && b < a_end
}

/// The checks VM_MAP makes before it looks at the handle: a non-zero
/// length, every value a multiple of the extent size, and an L1 range that
/// does not wrap. Returns the end of the L1 range.
pub fn check_map_args(l1_gpa: u64, l2_gpa: u64, len: u64) -> Result<u64, Status> {
    if len == 0 {
        return Err(Status::BadArg);
    }
    if !l1_gpa.is_multiple_of(EXTENT_SIZE)
        || !l2_gpa.is_multiple_of(EXTENT_SIZE)
        || !len.is_multiple_of(EXTENT_SIZE)
    {
        return Err(Status::Misaligned);
    }
    l1_gpa.checked_add(len).ok_or(Status::OutOfRange)
}

/// Which of the caller's regions, given as `(gpa, size, kind)`, holds all
/// of `[gpa, gpa + len)`; it must be nested memory (pool or grant window).
/// RAM, the channel, a range across two regions or outside every region is
/// `OutOfRange`. Returns the index of the region in `regions`.
pub fn nested_memory_region<'a>(
    regions: impl IntoIterator<Item = (u64, u64, &'a RegionKind)>,
    gpa: u64,
    len: u64,
) -> Result<usize, Status> {
    let end = gpa.checked_add(len).ok_or(Status::OutOfRange)?;
    let (i, kind) = regions
        .into_iter()
        .enumerate()
        .find(|(_, (r_gpa, r_size, _))| {
            gpa >= *r_gpa && r_gpa.checked_add(*r_size).is_some_and(|r_end| end <= r_end)
        })
        .map(|(i, (_, _, kind))| (i, kind))
        .ok_or(Status::OutOfRange)?;
    match kind {
        RegionKind::Pool | RegionKind::Grant { .. } => Ok(i),
        RegionKind::Ram | RegionKind::Channel => Err(Status::OutOfRange),
    }
}

/// The checks FILL_PATTERN makes on its range before looking at the slots:
/// 8-byte aligned start and length, non-zero, not wrapping. Returns the end.
pub fn check_fill_args(l2_gpa: u64, len: u64) -> Result<u64, Status> {
    if !l2_gpa.is_multiple_of(8) || !len.is_multiple_of(8) {
        return Err(Status::Misaligned);
    }
    if len == 0 {
        return Err(Status::BadArg);
    }
    l2_gpa.checked_add(len).ok_or(Status::OutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lengths_are_bounded() {
        assert_eq!(console_len(0), Ok(0));
        assert_eq!(console_len(DATA_LEN as u64), Ok(DATA_LEN));
        assert_eq!(console_len(DATA_LEN as u64 + 1), Err(Status::TooMany));
        assert_eq!(console_len(u64::MAX), Err(Status::TooMany));
    }

    #[test]
    fn map_arguments_are_checked() {
        let m = EXTENT_SIZE;
        assert_eq!(check_map_args(m, 0, m), Ok(2 * m));
        assert_eq!(check_map_args(m, 0, 0), Err(Status::BadArg));
        assert_eq!(check_map_args(m + 1, 0, m), Err(Status::Misaligned));
        assert_eq!(check_map_args(m, 4096, m), Err(Status::Misaligned));
        assert_eq!(check_map_args(m, 0, m - 1), Err(Status::Misaligned));
        let top = 0u64.wrapping_sub(m);
        assert_eq!(check_map_args(top, 0, m), Err(Status::OutOfRange));
    }

    #[test]
    fn only_nested_memory_can_be_mapped() {
        let m = EXTENT_SIZE;
        let grant = RegionKind::Grant { guest: "g".into() };
        let regions = [
            (0, 16 * m, &RegionKind::Ram),
            (
                layout::CHANNEL_BASE,
                layout::CHANNEL_SIZE,
                &RegionKind::Channel,
            ),
            (layout::POOL_BASE, 8 * m, &RegionKind::Pool),
            (layout::GRANT_BASE, 4 * m, &grant),
        ];
        let find = |gpa, len| nested_memory_region(regions.iter().copied(), gpa, len);
        assert_eq!(find(layout::POOL_BASE, 8 * m), Ok(2));
        assert_eq!(find(layout::GRANT_BASE + m, m), Ok(3));
        assert_eq!(find(0, m), Err(Status::OutOfRange));
        assert_eq!(find(layout::CHANNEL_BASE, 4096), Err(Status::OutOfRange));
        assert_eq!(find(layout::POOL_BASE, 9 * m), Err(Status::OutOfRange));
        assert_eq!(find(layout::POOL_BASE - m, 2 * m), Err(Status::OutOfRange));
        assert_eq!(find(u64::MAX - m + 1, m), Err(Status::OutOfRange));
        // A region that would wrap the address space matches nothing.
        let wrap = [(u64::MAX - m + 1, 2 * m, &RegionKind::Pool)];
        assert_eq!(
            nested_memory_region(wrap.iter().copied(), u64::MAX - m + 1, m),
            Err(Status::OutOfRange)
        );
    }

    #[test]
    fn fill_arguments_are_checked() {
        assert_eq!(check_fill_args(0, 8), Ok(8));
        assert_eq!(check_fill_args(4, 8), Err(Status::Misaligned));
        assert_eq!(check_fill_args(0, 12), Err(Status::Misaligned));
        assert_eq!(check_fill_args(8, 0), Err(Status::BadArg));
        assert_eq!(check_fill_args(u64::MAX - 7, 8), Err(Status::OutOfRange));
        assert!(!ranges_overlap(0, 8, 8, 16));
        assert!(ranges_overlap(0, 9, 8, 16));
    }
}
