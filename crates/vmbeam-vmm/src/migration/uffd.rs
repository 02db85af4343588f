//! userfaultfd: a thread of ours answers the page faults of a memory range.
//!
//! Post-copy migration resumes a host VM on the destination before its
//! memory has arrived. The mapping of that memory (the one KVM's slots, the
//! nested VMs' slots and L0 itself use) is registered here in MISSING mode:
//! a first touch of a page that is not in the memfd yet — by a vCPU through
//! KVM, by a nested VM, or by L0 — blocks the toucher in the kernel and
//! sends a message to this file descriptor; the fetching thread answers
//! with UFFDIO_COPY (the page's bytes, placed atomically, waking every
//! waiter) once the page has come over the network.
//!
//! This is the kernel ABI of `linux/userfaultfd.h` (five ioctls and one
//! message format) over `libc`, rather than the `userfaultfd` crate: that
//! crate's `userfaultfd-sys` runs bindgen at build time, which needs
//! libclang on every machine that builds vmbeam (docs/kvm-notes.md says
//! more). The structures below are the kernel's, field for field.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Errors of userfaultfd handling.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The syscall or an ioctl failed.
    #[error("userfaultfd {what}: {source}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The kernel lacks what post-copy needs.
    #[error("userfaultfd on this kernel cannot {0}")]
    Unsupported(&'static str),
    /// A message of an unexpected kind or size.
    #[error("userfaultfd sent an unexpected message (event {0:#x})")]
    Message(u8),
}

const UFFD_API: u64 = 0xaa;
const IOC: u64 = 0xaa;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (IOC << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (IOC << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);

/// Register mode: faults on pages that are not there.
pub const MODE_MISSING: u64 = 1;
/// Register mode: faults on pages the page cache has but the mapping lacks.
pub const MODE_MINOR: u64 = 4;

/// Feature bit: MISSING mode on shmem (memfd) mappings (Linux 4.11).
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// Feature bit: MINOR mode on shmem with UFFDIO_CONTINUE (Linux 5.14).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// Feature bit: the faulting thread's id in each message.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;

const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault arm is read.
#[repr(C)]
#[derive(Default)]
struct Msg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const _: () = assert!(std::mem::size_of::<Msg>() == 32);
const _: () = assert!(std::mem::size_of::<CopyArg>() == 40);
const _: () = assert!(std::mem::size_of::<RegisterArg>() == 32);

/// One page fault: the faulting address and whether it was a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host address (not page-aligned).
    pub addr: u64,
    /// A write access.
    pub write: bool,
}

/// What UFFDIO_COPY did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The bytes were placed and waiters woken.
    Copied,
    /// The page was already there (placed earlier); nothing changed.
    AlreadyThere,
}

/// An open, initialised userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn os(what: &'static str) -> UffdError {
    UffdError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn open_raw() -> Result<OwnedFd, UffdError> {
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked.
    // Not UFFD_USER_MODE_ONLY: KVM touches guest memory from the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(os(
            "open (root, or vm.unprivileged_userfaultfd=1, is needed for faults from KVM)",
        ));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Uffd {
    /// Features this kernel offers (a throw-away descriptor is asked).
    pub fn kernel_features() -> Result<u64, UffdError> {
        let fd = open_raw()?;
        let mut a = ApiArg {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API on our fd with a properly sized argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut a) } != 0 {
            return Err(os("API handshake"));
        }
        Ok(a.features)
    }

    /// Opens a userfaultfd able to serve MISSING faults on memfd mappings.
    pub fn open() -> Result<Uffd, UffdError> {
        if Self::kernel_features()? & FEATURE_MISSING_SHMEM == 0 {
            return Err(UffdError::Unsupported("serve faults on shared memory"));
        }
        let fd = open_raw()?;
        let mut a = ApiArg {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: as in `kernel_features`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut a) } != 0 {
            return Err(os("API handshake"));
        }
        Ok(Uffd { fd })
    }

    /// Registers `[addr, addr+len)` (page-aligned, inside one of our
    /// mappings) in `mode`; returns the ioctls the range supports.
    pub fn register(&self, addr: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut r = RegisterArg {
            range: Range { start: addr, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: registration only changes how faults on the range are
        // handled; the range is a live mapping of the caller's.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) } != 0 {
            return Err(os("register"));
        }
        if r.ioctls & (1 << 3) == 0 {
            return Err(UffdError::Unsupported("copy pages into this mapping"));
        }
        Ok(r.ioctls)
    }

    /// Unregisters a range (waiters, if any, are woken and retry the access).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start: addr, len };
        // SAFETY: as in `register`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) } != 0 {
            return Err(os("unregister"));
        }
        Ok(())
    }

    /// Wakes threads waiting on `[addr, addr+len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start: addr, len };
        // SAFETY: as in `register`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } != 0 {
            return Err(os("wake"));
        }
        Ok(())
    }

    /// Places `src` at `dst` (page-aligned, registered, `src.len()` a
    /// multiple of 4 KiB) atomically and wakes the waiters.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<Placed, UffdError> {
        let mut done = 0u64;
        let len = src.len() as u64;
        let mut already = false;
        while done < len {
            let mut c = CopyArg {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `src` is a live buffer of `len` bytes; `dst` lies in a
            // registered range; the kernel copies, it keeps no pointer.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            if r == 0 {
                done += c.copy as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Part (or all) of the range is there already: skip a page.
                Some(libc::EEXIST) => {
                    already = true;
                    done += if c.copy > 0 { c.copy as u64 } else { 4096 };
                }
                Some(libc::EAGAIN) if c.copy > 0 => done += c.copy as u64,
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => {
                    return Err(UffdError::Os {
                        what: "copy",
                        source: e,
                    })
                }
            }
        }
        Ok(if already {
            Placed::AlreadyThere
        } else {
            Placed::Copied
        })
    }

    /// Places zero pages at `[dst, dst+len)` and wakes the waiters.
    pub fn zero(&self, dst: u64, len: u64) -> Result<Placed, UffdError> {
        let mut z = ZeroArg {
            range: Range { start: dst, len },
            ..Default::default()
        };
        // SAFETY: as in `copy`, without a source buffer.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) } == 0 {
            return Ok(Placed::Copied);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) || z.zeropage as u64 != len {
            // Some pages were there: place the rest page by page.
            let page = [0u8; 4096];
            let mut at = 0;
            while at < len {
                self.copy(dst + at, &page)?;
                at += 4096;
            }
            return Ok(Placed::AlreadyThere);
        }
        Err(UffdError::Os {
            what: "zero page",
            source: e,
        })
    }

    /// The next page fault, waiting at most `timeout`; `None` on timeout.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(None);
            }
            return Err(UffdError::Os {
                what: "poll",
                source: e,
            });
        }
        if r == 0 {
            return Ok(None);
        }
        let mut m = Msg::default();
        // SAFETY: reads one 32-byte message into `m`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut m as *mut Msg as *mut libc::c_void,
                std::mem::size_of::<Msg>(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return Ok(None);
            }
            return Err(UffdError::Os {
                what: "read",
                source: e,
            });
        }
        if n as usize != std::mem::size_of::<Msg>() || m.event != EVENT_PAGEFAULT {
            return Err(UffdError::Message(m.event));
        }
        Ok(Some(Fault {
            addr: m.address,
            write: m.flags & PAGEFAULT_FLAG_WRITE != 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }
}
