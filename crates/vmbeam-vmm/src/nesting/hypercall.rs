//! Executes the hypercalls a guest hypervisor issues.
//!
//! Every argument comes from a guest we do not trust: each op checks
//! handles, ranges (overflow, alignment, ownership), counts and roles, and
//! answers with a [`Status`] instead of failing. Nothing here panics on guest
//! input, and an error leaves L0's state as it was.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE};

use crate::host::hostvm::HostVm;
use crate::host::kick::SliceTimer;
use crate::host::memory::RegionKind;
use crate::migration::handover;
use crate::nesting::nested::{NestedSlot, NestedVm};
use crate::sync::{Rank, RankedMutex};

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
    check_name(&b).map(str::to_string)
}

fn nested(vm: &HostVm, handle: u64) -> Result<Arc<RankedMutex<NestedVm>>, Status> {
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
            let line = &p.data[..console_len(a[1])?];
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
            if let Some(r) = handover::unadopt(vm, h) {
                return r.map(|_| HcOutcome::Continue);
            }
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
            let idx = match handover::confirm_vcpu(vm, a[0] as u32) {
                Some(r) => r?,
                None => n.lock().unwrap().create_vcpu(&vm.shared.cpuid)?,
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
            let n = nested(vm, a[0])?;
            let mut n = n.lock().unwrap();
            if !n.frozen && (a[1] as usize) < n.vcpu_count() {
                // The guest is entered now: this ends its downtime after a move.
                handover::note_first_entry(vm, &n);
            }
            p.exit = n.run(a[1], Duration::from_micros(a[2]), a[3], timer)?;
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
    if successor {
        drop(table);
        if let Some(adopted) = handover::try_adopt(vm, &name, handle) {
            vm.nested.lock().unwrap().vms.insert(handle, adopted);
            p.ret[0] = handle as u64;
            return OK;
        }
        table = vm.nested.lock().unwrap();
        if table.vms.contains_key(&handle) {
            return Err(Status::Internal);
        }
    }
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
    table
        .vms
        .insert(handle, Arc::new(RankedMutex::new(Rank::NestedVm, n)));
    p.ret[0] = handle as u64;
    OK
}

fn vm_map(vm: &HostVm, handle: u64, l1_gpa: u64, l2_gpa: u64, len: u64) -> HcResult {
    let l1_end = check_map_args(l1_gpa, l2_gpa, len)?;
    let n = nested(vm, handle)?;
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
    let h = u32::try_from(handle).map_err(|_| Status::NoSuchHandle)?;
    if handover::is_adoption(vm, h) {
        // Adopting the aged guest hypervisor's VM: confirm, don't remap.
        let backing = (region_kind, file, offset);
        return handover::confirm_slot(vm, h, &n, &backing, (l1_gpa, l2_gpa, len))
            .map(|_| HcOutcome::Continue);
    }
    // No two nested VMs of this guest hypervisor may share memory.
    {
        let table = vm.nested.lock().unwrap();
        for (other_h, other) in table.vms.iter() {
            if *other_h as u64 == handle {
                continue;
            }
            let o = other.lock().unwrap();
            if o.slots
                .iter()
                .any(|s| ranges_overlap(l1_gpa, l1_end, s.l1_gpa, s.l1_gpa + s.len))
            {
                return Err(Status::Overlap);
            }
        }
    }
    if let RegionKind::Grant { guest } = &region_kind {
        handover::bind_granted(vm, h, &n, guest)?;
    }
    let mut n = n.lock().unwrap();
    if n.slots
        .iter()
        .any(|s| ranges_overlap(l1_gpa, l1_end, s.l1_gpa, s.l1_gpa + s.len))
    {
        return Err(Status::Overlap);
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

// ---------------------------------------------------------------------------
// Pure argument checks.
//
// Everything below decides on guest-supplied numbers alone, without KVM or
// a host VM, so it can be unit-tested and fuzzed (`fuzz/`): the ops above
// call these functions first, at the point where they used to check inline.
// ---------------------------------------------------------------------------

/// Checks a nested VM name as VM_CREATE receives it (`data[..16]`):
/// NUL-padded, non-empty, UTF-8, and only `[A-Za-z0-9._-]`; it may not
/// start with '.' nor end in `-g<digits>`, the form of host VM console
/// names, so a guest hypervisor cannot write into a host VM's console.
pub fn check_name(raw: &[u8; vmbeam_abi::NAME_LEN]) -> Result<&str, Status> {
    let n = vmbeam_abi::name_from_bytes(raw).ok_or(Status::BadArg)?;
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || n.starts_with('.')
    {
        return Err(Status::BadArg);
    }
    if let Some((_, g)) = n.rsplit_once("-g") {
        if !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()) {
            return Err(Status::BadArg);
        }
    }
    Ok(n)
}

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
    fn names_are_checked() {
        let n = |s: &[u8]| {
            let mut b = [0u8; vmbeam_abi::NAME_LEN];
            b[..s.len()].copy_from_slice(s);
            b
        };
        assert_eq!(check_name(&n(b"l2-0")), Ok("l2-0"));
        assert_eq!(check_name(&n(b"a.b_c-D9")), Ok("a.b_c-D9"));
        assert_eq!(check_name(&[b'x'; 16]), Ok("xxxxxxxxxxxxxxxx"));
        assert_eq!(check_name(&n(b"l2-gx")), Ok("l2-gx"));
        for bad in [
            &b""[..],
            b"a b",
            b"a/b",
            b"a\n",
            b"\xff",
            b"\xc3\xa9",
            b"hv0-g2",
            b".hidden",
        ] {
            assert_eq!(check_name(&n(bad)), Err(Status::BadArg), "{bad:?}");
        }
    }

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
