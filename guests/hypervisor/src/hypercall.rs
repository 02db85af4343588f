//! Typed wrappers around L0's paravirtual nesting interface.
//!
//! Every request goes through this vCPU's hypercall page and one 32-bit
//! `out` to the doorbell port; keeping that in one place means the page is
//! touched in exactly one way and every hypercall is counted for health.

use core::ptr::{addr_of, addr_of_mut};
use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::HYPERCALL_PORT;
use vmbeam_abi::state::VcpuState;
use vmbeam_abi::NAME_LEN;

/// Result of a hypercall.
pub type HcResult<T> = Result<T, Status>;

/// The hypercall page of vCPU 0 plus the count of calls issued.
pub struct Hypercalls {
    page: *mut HypercallPage,
    /// Hypercalls issued so far (health `nested_ops`).
    pub issued: u64,
}

impl Hypercalls {
    /// Uses the hypercall page at identity-mapped address `page`.
    pub fn new(page: u64) -> Self {
        Hypercalls {
            page: page as *mut HypercallPage,
            issued: 0,
        }
    }

    /// Writes `op` and `args` (rest zero), rings L0 and decodes the status.
    fn call(&mut self, op: u32, args: &[u64]) -> HcResult<()> {
        let p = self.page;
        // SAFETY: `p` is this vCPU's hypercall page, identity-mapped RAM that
        // only this vCPU and L0 (during the `out` below) touch. A stale status
        // is overwritten first so an unanswered call reads as an error.
        unsafe {
            addr_of_mut!((*p).op).write_volatile(op);
            addr_of_mut!((*p).status).write_volatile(Status::Internal as i32);
            let a = addr_of_mut!((*p).args) as *mut u64;
            for i in 0..8 {
                a.add(i).write_volatile(args.get(i).copied().unwrap_or(0));
            }
        }
        self.issued += 1;
        guest_rt::outl(HYPERCALL_PORT, op);
        // SAFETY: as above; L0 wrote the results during the `out`.
        let st = unsafe { addr_of!((*p).status).read_volatile() };
        match Status::from_i32(st) {
            Some(Status::Ok) => Ok(()),
            Some(s) => Err(s),
            None => Err(Status::Internal),
        }
    }

    /// Result word `i` of the last call.
    fn ret(&self, i: usize) -> u64 {
        // SAFETY: see `call`; `i < 8` at every call site.
        unsafe {
            (addr_of!((*self.page).ret) as *const u64)
                .add(i)
                .read_volatile()
        }
    }

    /// Copies `bytes` (at most `DATA_LEN`) into the page's data area.
    fn put_data(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(DATA_LEN);
        // SAFETY: see `call`; `n` fits the data area.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                addr_of_mut!((*self.page).data) as *mut u8,
                n,
            )
        };
        n
    }

    /// OP_PING: returns (ABI version, `v ^ PING_XOR`).
    pub fn ping(&mut self, v: u64) -> HcResult<(u64, u64)> {
        self.call(OP_PING, &[v])?;
        Ok((self.ret(0), self.ret(1)))
    }

    /// OP_CONSOLE_WRITE of `bytes` to the console of `handle`.
    pub fn console_write(&mut self, handle: u64, bytes: &[u8]) -> HcResult<()> {
        let n = self.put_data(bytes);
        self.call(OP_CONSOLE_WRITE, &[handle, n as u64])
    }

    /// OP_HEALTH with the counters in `HEALTH_ARGS` order.
    pub fn health(&mut self, args: &[u64; 8]) -> HcResult<()> {
        self.call(OP_HEALTH, args)
    }

    /// OP_WAIT for at most `us` microseconds.
    pub fn wait(&mut self, us: u64) -> HcResult<()> {
        self.call(OP_WAIT, &[us])
    }

    /// OP_VM_CREATE; returns the handle.
    pub fn vm_create(&mut self, name: &[u8; NAME_LEN]) -> HcResult<u64> {
        self.put_data(name);
        self.call(OP_VM_CREATE, &[])?;
        Ok(self.ret(0))
    }

    /// OP_VM_DESTROY.
    pub fn vm_destroy(&mut self, h: u64) -> HcResult<()> {
        self.call(OP_VM_DESTROY, &[h])
    }

    /// OP_VM_MAP of our `l1` range at nested `l2`.
    pub fn vm_map(&mut self, h: u64, l1: u64, l2: u64, len: u64) -> HcResult<()> {
        self.call(OP_VM_MAP, &[h, l1, l2, len])
    }

    /// OP_VCPU_CREATE; returns the vCPU index.
    pub fn vcpu_create(&mut self, h: u64) -> HcResult<u64> {
        self.call(OP_VCPU_CREATE, &[h])?;
        Ok(self.ret(0))
    }

    /// OP_VCPU_GET_STATE; `answer` completes a pending port read.
    pub fn vcpu_get_state(&mut self, h: u64, vcpu: u64, answer: u64) -> HcResult<VcpuState> {
        self.call(OP_VCPU_GET_STATE, &[h, vcpu, answer])?;
        // SAFETY: see `call`; any bit pattern is a valid VcpuState.
        Ok(unsafe { core::ptr::read(addr_of!((*self.page).state)) })
    }

    /// OP_VCPU_SET_STATE.
    pub fn vcpu_set_state(&mut self, h: u64, vcpu: u64, s: &VcpuState) -> HcResult<()> {
        // SAFETY: see `call`.
        unsafe { core::ptr::write(addr_of_mut!((*self.page).state), *s) };
        self.call(OP_VCPU_SET_STATE, &[h, vcpu])
    }

    /// OP_VCPU_RUN for at most `us`; `answer` completes a pending read.
    pub fn vcpu_run(&mut self, h: u64, vcpu: u64, us: u64, answer: u64) -> HcResult<NestedExit> {
        self.call(OP_VCPU_RUN, &[h, vcpu, us, answer])?;
        // SAFETY: see `call`; any bit pattern is a valid NestedExit.
        Ok(unsafe { core::ptr::read(addr_of!((*self.page).exit)) })
    }

    /// OP_FILL_PATTERN of nested range `gpa..gpa+len` with `seed`.
    pub fn fill_pattern(&mut self, h: u64, gpa: u64, len: u64, seed: u64) -> HcResult<()> {
        self.call(OP_FILL_PATTERN, &[h, gpa, len, seed])
    }

    /// OP_DEVICE_QUERY: the virtio id of device `i` bound to VM `h` and
    /// whether it is placed already.
    pub fn device_query(&mut self, h: u64, i: u64) -> HcResult<(u32, bool)> {
        self.call(OP_DEVICE_QUERY, &[h, i])?;
        Ok((self.ret(0) as u32, self.ret(1) != 0))
    }

    /// OP_DEVICE_PLACE of device `i` of VM `h` at nested `base`, line `irq`.
    pub fn device_place(&mut self, h: u64, i: u64, base: u64, irq: u32) -> HcResult<u32> {
        self.call(OP_DEVICE_PLACE, &[h, i, base, irq as u64])?;
        Ok(self.ret(0) as u32)
    }

    /// OP_HANDOVER_READY.
    pub fn handover_ready(&mut self) -> HcResult<()> {
        self.call(OP_HANDOVER_READY, &[])
    }

    /// OP_GRANT of VM `h`'s memory; fills `out`, returns the range count.
    pub fn grant(&mut self, h: u64, out: &mut [GrantRange]) -> HcResult<usize> {
        self.call(OP_GRANT, &[h])?;
        let n = self.ret(0) as usize;
        if n > out.len() || n > MAX_GRANT_RANGES {
            return Err(Status::TooMany);
        }
        for (k, r) in out[..n].iter_mut().enumerate() {
            // SAFETY: see `call`; `k < MAX_GRANT_RANGES` stays in the data area.
            *r = unsafe {
                (addr_of!((*self.page).data) as *const GrantRange)
                    .add(k)
                    .read_unaligned()
            };
        }
        Ok(n)
    }

    /// OP_OFFER (batch handover): offers VM `h`, whose live state L0 reads
    /// at `live` when it moves the guest.
    pub fn offer(&mut self, h: u64, live: u64) -> HcResult<()> {
        self.call(OP_OFFER, &[h, live])
    }

    /// OP_OFFER_END (batch handover): `n` guests were offered.
    pub fn offer_end(&mut self, n: u64) -> HcResult<()> {
        self.call(OP_OFFER_END, &[n])
    }

    /// OP_ADOPT (batch handover): takes the next offered guest, whose live
    /// state L0 writes at `live`. Fills `name` and `out`; returns the
    /// handle, memory bytes and range count.
    pub fn adopt(
        &mut self,
        live: u64,
        name: &mut [u8; NAME_LEN],
        out: &mut [GrantRange],
    ) -> HcResult<(u64, u64, usize)> {
        self.call(OP_ADOPT, &[live])?;
        let n = self.ret(2) as usize;
        if n == 0 || n > out.len() || n > MAX_GRANT_RANGES {
            return Err(Status::TooMany);
        }
        // SAFETY: see `call`; the name is the first NAME_LEN bytes of the
        // data area and the `n < MAX_GRANT_RANGES` ranges follow it.
        unsafe {
            let d = addr_of!((*self.page).data) as *const u8;
            core::ptr::copy_nonoverlapping(d, name.as_mut_ptr(), NAME_LEN);
            for (k, r) in out[..n].iter_mut().enumerate() {
                *r = (d.add(NAME_LEN) as *const GrantRange)
                    .add(k)
                    .read_unaligned();
            }
        }
        Ok((self.ret(0), self.ret(1), n))
    }

    /// OP_NOTIFY: rings the peer's doorbell.
    pub fn notify(&mut self) -> HcResult<()> {
        self.call(OP_NOTIFY, &[])
    }

    /// OP_HANDOVER_DONE with `count` guests; normally never returns.
    pub fn handover_done(&mut self, count: u64) -> HcResult<()> {
        self.call(OP_HANDOVER_DONE, &[count])
    }

    /// OP_HANDOVER_ABORT with a reason code.
    pub fn handover_abort(&mut self, reason: u64) -> HcResult<()> {
        self.call(OP_HANDOVER_ABORT, &[reason])
    }
}
