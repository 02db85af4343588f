//! The nested guest table and the L2 loader.
//!
//! A primary L1 creates each nested guest listed in its boot info: it takes
//! memory from the pool, has L0 create and map the VM, then builds the
//! guest's boot image (GDT, page tables, workload, boot parameters) through
//! its own identity map of that memory and sets the vCPU to 64-bit mode.
//! The table records what L1 needs to run, move or tear a guest down.

use crate::pool::{Range, Ranges};
use crate::{name_str, Hv};
use vmbeam_abi::boot::{workload, NestedSpec, MAX_NESTED};
use vmbeam_abi::handover::{GuestLive, MAX_GUEST_RANGES};
use vmbeam_abi::hypercall::Status;
use vmbeam_abi::l2::{self, L2BootParams};
use vmbeam_abi::layout::EXTENT_SIZE;
use vmbeam_abi::state::{long_mode_sregs, VcpuState, GDT_ENTRIES};
use vmbeam_abi::NAME_LEN;

/// Life cycle of a nested guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    /// Scheduled.
    Running,
    /// Executed HLT; kept (and handed over) but not scheduled.
    Halted,
    /// Died; its VM was destroyed.
    Crashed,
    /// Taken over from a predecessor, not yet resumed.
    Adopted,
    /// Moved to the successor in a batch handover that has not ended: not
    /// scheduled, its table slot (memory, handle) kept. If the handover
    /// rolls back, L0 gives it back and it runs here again; if it commits,
    /// this guest hypervisor is destroyed with the slot.
    Away,
}

/// One nested guest.
#[derive(Clone, Copy)]
pub struct Guest {
    /// Name.
    pub name: [u8; NAME_LEN],
    /// L0 handle.
    pub handle: u64,
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// Memory ranges (`ranges[..n_ranges]`).
    pub ranges: Ranges,
    /// Valid entries of `ranges`.
    pub n_ranges: usize,
    /// Console model, owed read answer, workload, seed, exits and moves:
    /// what L0 copies between guest hypervisors in a batch handover.
    pub live: GuestLive,
    /// Life cycle.
    pub state: GuestState,
    /// Memory came from the pool (else from the grant window).
    pub owned_by_pool: bool,
}

impl Guest {
    /// Takes the answer owed to a pending read, if any.
    pub fn take_pending(&mut self) -> Option<u64> {
        let v = (self.live.pending_valid != 0).then_some(self.live.pending_in);
        self.live.pending_valid = 0;
        v
    }

    /// Records the answer owed to a pending read.
    pub fn set_pending(&mut self, v: u64) {
        self.live.pending_in = v;
        self.live.pending_valid = 1;
    }

    /// An unused table entry.
    pub fn empty() -> Self {
        Guest {
            name: [0; NAME_LEN],
            handle: 0,
            mem_bytes: 0,
            ranges: [Range::default(); MAX_GUEST_RANGES],
            n_ranges: 0,
            live: GuestLive::default(),
            state: GuestState::Crashed,
            owned_by_pool: false,
        }
    }

    /// Whether the guest still exists in L0.
    pub fn is_live(&self) -> bool {
        self.state != GuestState::Crashed
    }
}

/// Name of a workload kind.
pub fn workload_name(kind: u32) -> &'static str {
    match kind {
        workload::MEMTOUCH => "memtouch",
        workload::TICKER => "ticker",
        workload::BLKCHECK => "blkcheck",
        workload::NETECHO => "netecho",
        _ => "unknown",
    }
}

/// Starts every guest of the boot info; failures are reported and skipped.
pub fn start_all(hv: &mut Hv) {
    for k in 0..(hv.boot.nested_count as usize).min(MAX_NESTED) {
        let spec = hv.boot.nested[k];
        if let Err((what, s)) = start(hv, &spec) {
            say!("start {} failed: {what} {s:?}", name_str(&spec.name));
            hv.health.errors += 1;
        }
    }
}

/// A failed step and its status.
type Fail = (&'static str, Status);

fn start(hv: &mut Hv, spec: &NestedSpec) -> Result<(), Fail> {
    let bad = |what| Err((what, Status::BadArg));
    let m = spec.module as usize;
    if m >= (hv.boot.module_count as usize).min(hv.boot.modules.len()) {
        return bad("module");
    }
    let module = hv.boot.modules[m];
    let mem = spec.mem_bytes;
    if mem < l2::MIN_MEM || !mem.is_multiple_of(EXTENT_SIZE) || mem > l2::MAX_GIB << 30 {
        return bad("mem size");
    }
    if module.size == 0 || module.size > l2::MAX_IMAGE || module.load_addr + module.size > mem {
        return bad("image");
    }
    if hv.n_guests >= MAX_NESTED {
        return Err(("table", Status::TooMany));
    }
    let mut g = Guest::empty();
    g.n_ranges = hv
        .pool
        .alloc(mem, &mut g.ranges)
        .ok_or(("pool", Status::NoResources))?;
    g.owned_by_pool = true;
    g.name = spec.name;
    g.mem_bytes = mem;
    g.live.workload = module.kind;
    g.live.seed = spec.seed;
    g.state = GuestState::Running;
    g.handle = match hv.hc.vm_create(&g.name) {
        Ok(h) => h,
        Err(s) => {
            hv.pool.free(&g.ranges[..g.n_ranges]);
            return Err(("vm_create", s));
        }
    };
    if let Err(e) = build(hv, &g, spec) {
        release(hv, &g);
        return Err(e);
    }
    say!(
        "started {}: {}MiB {} handle={}",
        name_str(&g.name),
        mem >> 20,
        workload_name(g.live.workload),
        g.handle
    );
    hv.guests[hv.n_guests] = g;
    hv.n_guests += 1;
    Ok(())
}

/// Maps the memory, writes the boot image and sets up the vCPU.
fn build(hv: &mut Hv, g: &Guest, spec: &NestedSpec) -> Result<(), Fail> {
    let h = g.handle;
    let r = &g.ranges[..g.n_ranges];
    for x in r {
        hv.hc
            .vm_map(h, x.l1_gpa, x.l2_gpa, x.len)
            .map_err(|s| ("vm_map", s))?;
    }
    let module = hv.boot.modules[spec.module as usize];
    let gib = g.mem_bytes.div_ceil(1 << 30);
    let pds_end = l2::PD_BASE + gib * 0x1000;
    let mut ok = zero_l2(r, l2::BOOT_PARAMS, pds_end - l2::BOOT_PARAMS);
    for (k, e) in GDT_ENTRIES.iter().enumerate() {
        ok &= put_u64(r, l2::GDT + k as u64 * 8, *e);
    }
    ok &= put_u64(r, l2::PML4, l2::PDPT | 0x3);
    for i in 0..gib {
        ok &= put_u64(r, l2::PDPT + i * 8, (l2::PD_BASE + i * 0x1000) | 0x3);
    }
    for j in 0..g.mem_bytes / EXTENT_SIZE {
        ok &= put_u64(r, l2::PD_BASE + j * 8, (j * EXTENT_SIZE) | 0x83);
    }
    // SAFETY: L0 placed the module image at `gpa..gpa+size` in this VM's
    // identity-mapped module area and never changes it.
    let image =
        unsafe { core::slice::from_raw_parts(module.gpa as *const u8, module.size as usize) };
    ok &= write_l2(r, module.load_addr, Some(image), module.size);
    let params = L2BootParams {
        magic: l2::L2_MAGIC,
        name: g.name,
        mem_bytes: g.mem_bytes,
        seed: spec.seed,
        tsc_khz: hv.boot.tsc_khz,
        param0: spec.param0,
        param1: spec.param1,
    };
    let bytes = vmbeam_abi::as_bytes(&params);
    ok &= write_l2(r, l2::BOOT_PARAMS, Some(bytes), bytes.len() as u64);
    if !ok {
        return Err(("image", Status::OutOfRange));
    }
    if module.kind == workload::MEMTOUCH {
        hv.hc
            .fill_pattern(h, l2::BULK_BASE, g.mem_bytes - l2::BULK_BASE, spec.seed)
            .map_err(|s| ("fill_pattern", s))?;
    }
    place_devices(hv, g, r)?;
    let vcpu = hv.hc.vcpu_create(h).map_err(|s| ("vcpu_create", s))?;
    let mut st = VcpuState::default();
    st.regs.rip = module.entry;
    st.regs.rsp = l2::STACK_TOP;
    st.regs.rflags = 2;
    st.sregs = long_mode_sregs(l2::GDT, l2::PML4);
    hv.hc
        .vcpu_set_state(h, vcpu, &st)
        .map_err(|s| ("vcpu_set_state", s))
}

/// Places every device the operator bound to the guest, device `i` at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE` with line `VIRTIO_IRQ_BASE + i`,
/// and maps the windows (one uncached 2 MiB page) in the guest's page
/// tables (for every guest that leaves room for them, devices or not). A
/// guest too large to leave room for the windows gets no devices.
fn place_devices(hv: &mut Hv, g: &Guest, r: &[Range]) -> Result<(), Fail> {
    for i in 0..l2::MAX_DEVICES as u64 {
        let kind = match hv.hc.device_query(g.handle, i) {
            Ok((k, _)) => k,
            Err(Status::NoSuchHandle) => break,
            Err(s) => return Err(("device_query", s)),
        };
        if g.mem_bytes > l2::MAX_MEM_WITH_DEVICES {
            say!(
                "{}: too much RAM for devices; device {i} left out",
                name_str(&g.name)
            );
            break;
        }
        let base = l2::VIRTIO_MMIO_BASE + i * l2::VIRTIO_MMIO_SIZE;
        let irq = l2::VIRTIO_IRQ_BASE + i as u32;
        hv.hc
            .device_place(g.handle, i, base, irq)
            .map_err(|s| ("device_place", s))?;
        say!(
            "{}: virtio device {kind} at {base:#x} irq {irq}",
            name_str(&g.name)
        );
    }
    // Mapped for every guest that leaves room, so a workload can probe the
    // windows (an unplaced one reads as all ones) without faulting.
    if g.mem_bytes <= l2::MAX_MEM_WITH_DEVICES {
        let gib = l2::VIRTIO_MMIO_BASE >> 30;
        let pd_index = (l2::VIRTIO_MMIO_BASE - (gib << 30)) / EXTENT_SIZE;
        let mut ok = zero_l2(r, l2::DEVICE_PD, 0x1000);
        // Present, writable, 2 MiB, cache disabled and write-through.
        ok &= put_u64(r, l2::DEVICE_PD + pd_index * 8, l2::VIRTIO_MMIO_BASE | 0x9b);
        ok &= put_u64(r, l2::PDPT + gib * 8, l2::DEVICE_PD | 0x3);
        if !ok {
            return Err(("device page table", Status::OutOfRange));
        }
    }
    Ok(())
}

/// L1 address of nested address `l2`, if mapped.
fn l1_of(r: &[Range], l2: u64) -> Option<u64> {
    r.iter()
        .find(|x| l2 >= x.l2_gpa && l2 - x.l2_gpa < x.len)
        .map(|x| x.l1_gpa + (l2 - x.l2_gpa))
}

/// Writes `len` bytes of `src` (zeros if `None`) at nested address `dst`.
fn write_l2(r: &[Range], dst: u64, src: Option<&[u8]>, len: u64) -> bool {
    let mut done = 0;
    while done < len {
        let a = dst + done;
        let Some(l1) = l1_of(r, a) else { return false };
        // Ranges are extent-aligned, so a chunk within one extent is contiguous in L1.
        let n = (EXTENT_SIZE - a % EXTENT_SIZE).min(len - done);
        // SAFETY: `l1..l1+n` is pool memory owned by this guest (just
        // allocated, identity-mapped); `src` holds at least `len` bytes.
        unsafe {
            match src {
                Some(s) => core::ptr::copy_nonoverlapping(
                    s.as_ptr().add(done as usize),
                    l1 as *mut u8,
                    n as usize,
                ),
                None => core::ptr::write_bytes(l1 as *mut u8, 0, n as usize),
            }
        }
        done += n;
    }
    true
}

fn zero_l2(r: &[Range], dst: u64, len: u64) -> bool {
    write_l2(r, dst, None, len)
}

fn put_u64(r: &[Range], dst: u64, v: u64) -> bool {
    write_l2(r, dst, Some(&v.to_le_bytes()), 8)
}

/// Destroys a VM being set up and gives its memory back.
fn release(hv: &mut Hv, g: &Guest) {
    match hv.hc.vm_destroy(g.handle) {
        Ok(()) if g.owned_by_pool => hv.pool.free(&g.ranges[..g.n_ranges]),
        Ok(()) => {}
        Err(_) => {
            // Still mapped into a VM L0 may keep: never reuse it.
            hv.health.errors += 1;
            if g.owned_by_pool {
                hv.health.leaked += g.mem_bytes;
            }
        }
    }
}

/// Marks guest `i` crashed, destroys its VM and frees its memory.
pub fn kill(hv: &mut Hv, i: usize) {
    let g = hv.guests[i];
    hv.guests[i].state = GuestState::Crashed;
    hv.guests[i].live.pending_valid = 0;
    release(hv, &g);
}
