//! Introspection of a running nested guest (`vmbeam inspect`, `POST /inspect`).
//!
//! L0 reads a nested guest's memory straight from the host pages that back
//! it (the same mapping its KVM memory slots use), so nothing is copied but
//! the bytes asked for and the guest is not paused: the reader only takes
//! the nested VM's lock, which the L1 vCPU thread holds for at most one
//! RUN time slice. Registers come from a read-only query
//! ([`crate::nesting::nested::NestedVm::peek_regs`]) that never completes a pending
//! exit; while one is pending, `Vmm::inspect` looks again at
//! the guest's next stops for a short while and then answers "busy".
//! Everything here is read-only, and one request reads at most
//! [`MAX_LEN`] bytes.

use vmbeam_abi::state::VcpuState;

/// Most bytes one inspect reads.
pub const MAX_LEN: u64 = 64 << 10;

/// Errors in an inspect request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    /// A GPA or length is not a number.
    #[error("invalid number '{0}': use decimal or 0x-prefixed hex, e.g. 4096 or 0x1000")]
    BadNumber(String),
    /// The length is above [`MAX_LEN`].
    #[error("cannot read {len} bytes: one inspect reads at most 65536 bytes (64 KiB)")]
    TooLong {
        /// Asked length.
        len: u64,
    },
    /// `gpa + len` overflows.
    #[error("the range at {gpa:#x} of {len} bytes runs past the end of the address space")]
    Overflow {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// Parses `4096` or `0x1000` (underscores allowed).
pub fn parse_number(s: &str) -> Result<u64, InspectError> {
    let t = s.trim().replace('_', "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| InspectError::BadNumber(s.to_string()))
}

/// Checks a requested range before anything is looked up.
pub fn check_range(gpa: u64, len: u64) -> Result<(), InspectError> {
    if len > MAX_LEN {
        return Err(InspectError::TooLong { len });
    }
    gpa.checked_add(len)
        .map(|_| ())
        .ok_or(InspectError::Overflow { gpa, len })
}

/// A number given as a JSON integer or as a string (`"0x1000"`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Number {
    /// `4096`.
    Int(u64),
    /// `"0x1000"` or `"4096"`.
    Text(String),
}

impl Number {
    /// The value.
    pub fn value(&self) -> Result<u64, InspectError> {
        match self {
            Number::Int(v) => Ok(*v),
            Number::Text(s) => parse_number(s),
        }
    }
}

/// Lower-case hex of `bytes`, two digits per byte, no separators.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Bytes of a [`to_hex`] string; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Registers of a nested vCPU as inspect shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct Registers {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub tsc: u64,
}

impl From<&VcpuState> for Registers {
    fn from(s: &VcpuState) -> Self {
        let r = &s.regs;
        Registers {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            cr0: s.sregs.cr0,
            cr2: s.sregs.cr2,
            cr3: s.sregs.cr3,
            cr4: s.sregs.cr4,
            efer: s.sregs.efer,
            cs: s.sregs.cs.selector,
            tsc: s.tsc,
        }
    }
}

/// What `POST /inspect` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Inspection {
    /// Nested guest.
    pub guest: String,
    /// Host VM line whose guest hypervisor runs it now.
    pub host_vm: String,
    /// Generation of that guest hypervisor.
    pub generation: u32,
    /// Times the guest has been moved.
    pub moves: u32,
    /// created/running/halted/crashed.
    pub state: String,
    /// Nested guest-physical start of `hex`.
    pub gpa: u64,
    /// Bytes read.
    pub len: u64,
    /// The bytes, lower-case hex.
    pub hex: String,
    /// `ok`, `busy` (an exit is pending; try again), `no vcpu`, or an error.
    pub regs_status: String,
    /// vCPU 0's registers when `regs_status` is `ok`.
    pub regs: Option<Registers>,
}

impl Inspection {
    /// The bytes read.
    pub fn bytes(&self) -> Vec<u8> {
        from_hex(&self.hex).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse() {
        assert_eq!(parse_number("4096"), Ok(4096));
        assert_eq!(parse_number("0x1000"), Ok(4096));
        assert_eq!(parse_number(" 0X10_0000 "), Ok(0x10_0000));
        for bad in ["", "0x", "x10", "12k", "-1", "0xfffffffffffffffff"] {
            let e = parse_number(bad).unwrap_err();
            assert!(
                e.to_string().contains("use decimal or 0x-prefixed hex"),
                "{e}"
            );
        }
        assert_eq!(Number::Int(7).value(), Ok(7));
        assert_eq!(Number::Text("0x20".into()).value(), Ok(32));
        let n: Number = serde_json::from_str("\"0x1000\"").unwrap();
        assert_eq!(n.value(), Ok(4096));
        let n: Number = serde_json::from_str("4096").unwrap();
        assert_eq!(n.value(), Ok(4096));
    }

    #[test]
    fn ranges_are_limited() {
        assert!(check_range(0x1000, MAX_LEN).is_ok());
        assert!(check_range(0, 0).is_ok());
        let e = check_range(0x1000, MAX_LEN + 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read 65537 bytes: one inspect reads at most 65536 bytes (64 KiB)"
        );
        assert!(matches!(
            check_range(u64::MAX, 2),
            Err(InspectError::Overflow { .. })
        ));
    }

    #[test]
    fn hex_round_trips() {
        let b = 0x766d_6265_616d_4c32u64.to_le_bytes();
        let h = to_hex(&b);
        assert_eq!(h, "324c6d6165626d76");
        assert_eq!(from_hex(&h).unwrap(), b);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
