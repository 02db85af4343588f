//! The nested VMs of one host VM, and which of its guest hypervisor's
//! memory each one owns.
//!
//! The table is the one place that decides, under its own lock, whether a
//! name or a range of L1 memory is free: VM_CREATE reserves its name and
//! VM_MAP claims its L1 range here before the (slow) KVM work is done
//! outside the lock, so two vCPUs of one guest hypervisor cannot both win,
//! and nothing that only reads the table (status) waits for a KVM call or
//! for a nested VM's RUN.

use std::collections::BTreeMap;

use vmbeam_abi::hypercall::Status;

use crate::nesting::nested::{NestedCell, NestedRef, NestedVm};

/// L1 memory `[start, end)` owned by nested VM `handle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Claim {
    /// First L1 address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Owner.
    pub handle: u32,
}

/// Nested VMs of one host VM.
#[derive(Default)]
pub struct NestedTable {
    /// Last handle handed out.
    pub next_handle: u32,
    /// Live nested VMs by handle.
    pub vms: BTreeMap<u32, NestedRef>,
    /// VM_CREATEs under way: name and handle reserved, VM not built yet.
    pub creating: Vec<(String, u32)>,
    /// L1 ranges mapped, or being mapped, into nested VMs. A VM adopted
    /// away by a successor keeps its claims here until the handover ends,
    /// so its pages cannot be mapped into another VM meanwhile.
    pub claims: Vec<L1Claim>,
}

impl NestedTable {
    /// The live nested VMs, cloned out so the table's lock can be released
    /// before any of them is locked.
    pub fn snapshot(&self) -> Vec<NestedRef> {
        self.vms.values().cloned().collect()
    }

    /// Nested VMs that exist or are being created.
    pub fn count(&self) -> usize {
        self.vms.len() + self.creating.len()
    }

    /// True if a nested VM called `name` exists or is being created.
    pub fn has_name(&self, name: &str) -> bool {
        self.creating.iter().any(|(n, _)| n == name)
            || self.vms.values().any(|v| v.summary().name == name)
    }

    /// A handle not in use (nor reserved, nor owning claims).
    pub fn alloc_handle(&mut self) -> u32 {
        loop {
            self.next_handle = self.next_handle.wrapping_add(1).max(1);
            let h = self.next_handle;
            if !self.vms.contains_key(&h)
                && !self.creating.iter().any(|(_, c)| *c == h)
                && !self.claims.iter().any(|c| c.handle == h)
            {
                return h;
            }
        }
    }

    /// Claims `[start, end)` for `handle`: refused with `Overlap` if any
    /// nested VM (this one included) owns a byte of it.
    pub fn claim(&mut self, handle: u32, start: u64, end: u64) -> Result<(), Status> {
        if self.claims.iter().any(|c| start < c.end && c.start < end) {
            return Err(Status::Overlap);
        }
        self.claims.push(L1Claim { start, end, handle });
        Ok(())
    }

    /// Gives back the claim of `handle` that starts at `start`.
    pub fn release_claim(&mut self, handle: u32, start: u64) {
        self.claims
            .retain(|c| !(c.handle == handle && c.start == start));
    }

    /// Gives back every claim of `handle`.
    pub fn release_handle(&mut self, handle: u32) {
        self.claims.retain(|c| c.handle != handle);
    }

    /// Adds a nested VM built outside the table (an incoming migration):
    /// its slots become its claims.
    pub fn add(&mut self, handle: u32, vm: NestedVm) -> Result<NestedRef, Status> {
        for s in &vm.slots {
            self.claim(handle, s.l1_gpa, s.l1_gpa + s.len)?;
        }
        let cell = NestedCell::new(vm);
        self.vms.insert(handle, cell.clone());
        Ok(cell)
    }

    /// Empties the table; returns the VMs.
    pub fn take_all(&mut self) -> Vec<NestedRef> {
        self.claims.clear();
        std::mem::take(&mut self.vms).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_never_overlap_and_are_released() {
        let mut t = NestedTable::default();
        assert_eq!(t.claim(1, 0, 10), Ok(()));
        assert_eq!(t.claim(2, 5, 15), Err(Status::Overlap));
        assert_eq!(t.claim(1, 9, 12), Err(Status::Overlap));
        assert_eq!(t.claim(2, 10, 20), Ok(()));
        t.release_claim(2, 10);
        assert_eq!(t.claim(3, 10, 20), Ok(()));
        t.release_handle(1);
        assert_eq!(t.claim(3, 0, 10), Ok(()));
        // A handle that owns claims is not handed out again.
        t.next_handle = 2;
        assert_eq!(t.alloc_handle(), 4);
        t.creating.push(("x".into(), 5));
        assert!(t.has_name("x"));
        assert_eq!(t.count(), 1);
        assert_eq!(t.alloc_handle(), 6);
    }
}
