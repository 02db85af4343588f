//! Opening an existing TAP interface for a virtio-net backend.
//!
//! vmbeam never creates interfaces: the operator makes the TAP (for
//! example `ip tuntap add NAME mode tap`) and names it; a name with no
//! interface behind it is refused.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens TAP `name` (non-blocking, frames without packet information).
pub fn open(name: &str) -> Result<File, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err("is not a valid interface name".into());
    }
    if !std::path::Path::new("/sys/class/net").join(name).exists() {
        return Err("does not exist (create it first, e.g. `ip tuntap add NAME mode tap`)".into());
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
    // is (name, flags, padding to its full size).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    if r != 0 {
        return Err(format!(
            "cannot be attached (is it a TAP, and not in use?): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}
