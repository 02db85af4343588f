//! The round-robin scheduler and nested exit handling.
//!
//! L1 has one vCPU and no interrupts, so it runs each live nested guest for
//! one time slice in turn, handles what made it stop (console I/O, halts,
//! crashes), and between passes watches the control word for a handover
//! request and reports health to L0.

use crate::nested::{self, GuestState};
use crate::{handover, health, uart, Hv};
use vmbeam_abi::boot::control;
use vmbeam_abi::hypercall::{exit, NestedExit, Status};

/// Slice used when L0 gives none.
const DEFAULT_SLICE_US: u64 = 10_000;
/// Idle wait when no guest is runnable.
const IDLE_WAIT_US: u64 = 20_000;

/// Schedules the guests forever.
pub fn run(hv: &mut Hv) -> ! {
    let mut last_control = control::NONE;
    loop {
        let mut ran = false;
        // Fault injection: only the first guest runs here, so it moves
        // while L0 has to force the others' moves, 100 ms apart.
        let n = match last_control {
            control::HANDOVER_BATCH_THEN_CRASH | control::HANDOVER_BATCH_FIRST_ONLY => 1,
            _ => hv.n_guests,
        };
        for i in 0..n {
            if hv.guests[i].state == GuestState::Running {
                ran = true;
                step(hv, i);
            }
        }
        let c = hv.control();
        if last_control != c {
            if control::is_batch(c) {
                handover::aged_batch(hv);
            } else if control::is_batch(last_control) {
                handover::batch_ended(hv);
            }
        }
        if let Some(fault) = handover::AgedFault::of_control(c) {
            if last_control != c {
                handover::aged(hv, fault);
            }
        }
        last_control = c;
        health::tick(hv);
        if !ran {
            let _ = hv.hc.wait(IDLE_WAIT_US);
        }
    }
}

/// Runs guest `i` for one slice and handles its exit.
pub fn step(hv: &mut Hv, i: usize) {
    let g = &mut hv.guests[i];
    let answer = g.take_pending().unwrap_or(0);
    let slice = match hv.boot.slice_us {
        0 => DEFAULT_SLICE_US,
        s => s as u64,
    };
    let res = hv.hc.vcpu_run(g.handle, 0, slice, answer);
    health::age(hv);
    match res {
        Ok(e) => handle_exit(hv, i, &e),
        // Batch handover: L0 moved the guest to the successor, with the
        // state kept in `live`. Its slot stays until the handover ends: a
        // rollback gives it back (`handover::batch_ended`).
        Err(Status::Moved) => {
            hv.guests[i].state = GuestState::Away;
            say!("{} moved to the successor", hv.name(i));
            if hv.control() == control::HANDOVER_BATCH_THEN_CRASH {
                say!("fault: crashing after the first move");
                guest_rt::crash();
            }
        }
        Err(s) => {
            say!("nested guest {} run failed: {s:?}", hv.name(i));
            hv.health.errors += 1;
            nested::kill(hv, i);
        }
    }
}

/// All-ones value of an access of `size` bytes.
fn ones(size: u32) -> u64 {
    match size {
        1..=7 => (1u64 << (size * 8)) - 1,
        _ => u64::MAX,
    }
}

fn handle_exit(hv: &mut Hv, i: usize, e: &NestedExit) {
    hv.health.exits += 1;
    let g = &mut hv.guests[i];
    g.live.exits += 1;
    match e.reason {
        exit::SLICE | exit::MMIO_WRITE => {}
        exit::IO_OUT if uart::is_uart(e.port) => {
            if uart::write(&mut g.live.uart, e.port - uart::BASE, e.data as u8) {
                let n = (g.live.uart.line_len as usize).min(g.live.uart.line.len());
                g.live.uart.line_len = 0;
                if hv
                    .hc
                    .console_write(g.handle, &g.live.uart.line[..n])
                    .is_err()
                {
                    hv.health.errors += 1;
                }
            }
        }
        exit::IO_OUT => {}
        exit::IO_IN if uart::is_uart(e.port) => {
            let v = uart::read(&g.live.uart, e.port - uart::BASE) as u64;
            g.set_pending(v);
        }
        exit::IO_IN | exit::MMIO_READ => g.set_pending(ones(e.size)),
        exit::HLT => {
            g.state = GuestState::Halted;
            say!("{} halted", hv.name(i));
        }
        r => {
            let why = match r {
                exit::SHUTDOWN => "shutdown",
                exit::FAIL => "fail",
                _ => "unknown exit",
            };
            say!(
                "nested guest {} crashed: {why} detail={:x}",
                hv.name(i),
                e.detail
            );
            hv.health.errors += 1;
            nested::kill(hv, i);
        }
    }
}
