//! The 16550 UART L1 emulates for each nested guest's console.
//!
//! Nested guests print by writing the THR at 0x3f8; L1 sees each access as
//! an I/O exit. This model keeps just enough register state for a polling
//! driver and collects output into lines, which L1 forwards to L0 one
//! hypercall per line. The state is `handover::UartState` so it moves with
//! the guest.

use vmbeam_abi::handover::{UartState, UART_LINE};

/// First port of the UART.
pub const BASE: u32 = 0x3f8;

/// Whether `port` belongs to the UART.
pub fn is_uart(port: u32) -> bool {
    (BASE..=BASE + 7).contains(&port)
}

fn dlab(u: &UartState) -> bool {
    u.lcr & 0x80 != 0
}

/// A guest write of `v` to register `off`; true when a line is ready
/// (`u.line[..u.line_len]`, to be forwarded and then cleared).
pub fn write(u: &mut UartState, off: u32, v: u8) -> bool {
    match off {
        0 if dlab(u) => u.dll = v,
        0 => return push(u, v),
        1 if dlab(u) => u.dlm = v,
        1 => u.ier = v,
        3 => u.lcr = v,
        4 => u.mcr = v,
        7 => u.scr = v,
        _ => {} // FCR, LSR, MSR: nothing to store.
    }
    false
}

/// Appends a THR byte to the line buffer.
fn push(u: &mut UartState, v: u8) -> bool {
    match v {
        b'\n' => u.line_len > 0,
        b'\r' => false,
        _ => {
            let n = u.line_len as usize;
            if n < UART_LINE {
                u.line[n] = v;
                u.line_len += 1;
            }
            u.line_len as usize >= UART_LINE
        }
    }
}

/// A guest read of register `off`.
pub fn read(u: &UartState, off: u32) -> u8 {
    match off {
        0 if dlab(u) => u.dll,
        0 => 0, // RBR: no input.
        1 if dlab(u) => u.dlm,
        1 => u.ier,
        2 => 0x01, // IIR: no interrupt pending.
        3 => u.lcr,
        4 => u.mcr,
        5 => 0x60, // LSR: THR and transmitter empty.
        6 => 0xb0, // MSR: CTS, DSR, DCD.
        _ => u.scr,
    }
}
