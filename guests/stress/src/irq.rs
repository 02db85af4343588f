//! `IRQ` mode: INJECT_IRQ must honour the nested guest's interrupt flag.
//!
//! The nested guest runs in real mode. Its interrupt table sends vector
//! [`VECTOR`] to a handler that counts in a word at 0x300. It reports at
//! each step with an `out` whose data is the count: with interrupts
//! disabled (an injected interrupt must wait), after `sti` (the waiting
//! interrupt arrives once the guest can take it, at the latest by its next
//! report), and in a loop with interrupts enabled (an interrupt injected
//! there arrives before the next report).

use vmbeam_abi::hypercall::{exit, Status, OP_INJECT_IRQ, OP_VCPU_RUN};

use crate::{name, poke, real_mode_vm, say, Hc};

/// Vector injected.
const VECTOR: u64 = 0x40;

/// Real-mode code at nested address 0.
const CODE: [u8; 0x16] = [
    0xfa, // 00: cli
    0xe6, 0x80, // 01: out 0x80, al        (interrupts are off now)
    0xa0, 0x00, 0x03, // 03: mov al, [0x300]
    0xe6, 0x81, // 06: out 0x81, al        (count while still off)
    0xfb, // 08: sti
    0x90, // 09: nop                 (the sti shadow ends here)
    0xa0, 0x00, 0x03, // 0a: mov al, [0x300]
    0xe6, 0x82, // 0d: out 0x82, al        (count once interrupts are on)
    0xa0, 0x00, 0x03, // 0f: mov al, [0x300]
    0xe6, 0x83, // 12: out 0x83, al        (count in the loop)
    0xeb, 0xf9, // 14: jmp 0x0f
];

/// RUNs until the next port write; its port and data.
fn next_out(hc: &mut Hc, h: u64) -> Result<(u32, u64), Status> {
    for _ in 0..64 {
        hc.call(OP_VCPU_RUN, &[h, 0, 100_000, 0])?;
        let e = hc.exit();
        match e.reason {
            exit::IO_OUT => return Ok((e.port, e.data & 0xff)),
            exit::SLICE => {}
            _ => return Err(Status::BadState),
        }
    }
    Err(Status::BadState)
}

/// Runs the scenario and reports `irq: ... ok` or `... UNEXPECTED`.
pub fn run(hc: &mut Hc, pool: u64) {
    let extent = 4;
    let l1 = pool + extent * crate::M2;
    // Interrupt table entry VECTOR -> 0000:0200; handler: inc word [0x300]; iret.
    poke(l1 + VECTOR * 4, &[0x00, 0x02, 0x00, 0x00]);
    poke(l1 + 0x200, &[0xff, 0x06, 0x00, 0x03, 0xcf]);
    poke(l1 + 0x300, &[0, 0]);
    let h = match real_mode_vm(hc, &name(b"irq", 0), pool, extent, &CODE) {
        Ok(h) => h,
        Err(s) => {
            say!(hc, "irq: set-up failed: {:?} UNEXPECTED", s);
            return;
        }
    };
    let mut seen = [u64::MAX; 3];
    let mut bad = 0;
    let mut step = |hc: &mut Hc, want_port: u32, inject: bool| -> u64 {
        if inject {
            if let Err(s) = hc.call(OP_INJECT_IRQ, &[h, 0, VECTOR]) {
                say!(
                    hc,
                    "irq: INJECT_IRQ before port {:#x}: {:?} UNEXPECTED",
                    want_port,
                    s
                );
                bad += 1;
            }
        }
        match next_out(hc, h) {
            Ok((p, d)) if p == want_port => d,
            r => {
                say!(
                    hc,
                    "irq: wanted port {:#x}, got {:?} UNEXPECTED",
                    want_port,
                    r
                );
                bad += 1;
                u64::MAX
            }
        }
    };
    step(hc, 0x80, false);
    seen[0] = step(hc, 0x81, true);
    let after_sti = step(hc, 0x82, false);
    seen[1] = step(hc, 0x83, false);
    seen[2] = step(hc, 0x83, true);
    if after_sti > 1 {
        bad += 1;
    }
    let ok = bad == 0 && seen == [0, 1, 2];
    say!(
        hc,
        "irq: counted {} with interrupts off, {} once they were on, {} after an injection with them on {}",
        seen[0],
        seen[1],
        seen[2],
        if ok { "ok" } else { "UNEXPECTED" }
    );
}
