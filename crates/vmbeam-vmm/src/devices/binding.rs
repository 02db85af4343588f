//! Backends the operator binds to nested guest names on L0's command line
//! (`--disk l2-0=PATH[,ro]`, `--net l2-1=tap:NAME[,mac=..]`).
//!
//! Only the operator names host files and interfaces: a guest hypervisor
//! can place a bound device or leave it out, never choose what backs it.
//! Everything is parsed and opened before any VM starts, so a missing
//! image, a read-only file given as writable or a missing TAP is one clear
//! sentence at start-up.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a binding was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindError {
    /// Not `NAME=...`.
    #[error("bad {what} binding '{text}': {why}")]
    Syntax {
        /// `--disk` or `--net`.
        what: &'static str,
        /// The text.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// The image cannot be used.
    #[error("disk image {path} for {guest}: {why}")]
    Image {
        /// Guest.
        guest: String,
        /// Path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The TAP cannot be used.
    #[error("TAP {tap} for {guest}: {why}")]
    Tap {
        /// Guest.
        guest: String,
        /// Interface name.
        tap: String,
        /// What is wrong.
        why: String,
    },
    /// Bound to a guest that is never created.
    #[error(
        "a device is bound to nested guest '{0}', which this VMM does not create (it creates {1})"
    )]
    NoSuchGuest(String, String),
    /// Too many devices for one guest.
    #[error("nested guest '{0}' has more than {1} devices bound")]
    TooMany(String, usize),
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A raw image.
    Disk {
        /// Path.
        path: PathBuf,
        /// Read-only.
        ro: bool,
    },
    /// A TAP interface.
    Net {
        /// Interface name.
        tap: String,
        /// MAC (derived from the guest name if `None`).
        mac: Option<[u8; 6]>,
    },
}

/// One `--disk` or `--net` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Nested guest name.
    pub guest: String,
    /// Backend.
    pub spec: BackendSpec,
}

fn split<'a>(what: &'static str, s: &'a str) -> Result<(&'a str, Vec<&'a str>), BindError> {
    let bad = |why: &str| BindError::Syntax {
        what,
        text: s.to_string(),
        why: why.to_string(),
    };
    let (guest, rest) = s.split_once('=').ok_or_else(|| bad("expected GUEST=..."))?;
    if guest.is_empty() || guest.len() > vmbeam_abi::NAME_LEN {
        return Err(bad("the guest name must be 1 to 16 characters"));
    }
    if rest.is_empty() {
        return Err(bad("nothing after '='"));
    }
    Ok((guest, rest.split(',').collect()))
}

/// Parses `GUEST=PATH[,ro]`.
pub fn parse_disk(s: &str) -> Result<Binding, BindError> {
    let (guest, parts) = split("--disk", s)?;
    let mut ro = false;
    for p in &parts[1..] {
        match *p {
            "ro" => ro = true,
            o => {
                return Err(BindError::Syntax {
                    what: "--disk",
                    text: s.to_string(),
                    why: format!("unknown option '{o}' (only 'ro')"),
                })
            }
        }
    }
    if parts[0].is_empty() {
        return Err(BindError::Syntax {
            what: "--disk",
            text: s.to_string(),
            why: "empty path".into(),
        });
    }
    Ok(Binding {
        guest: guest.to_string(),
        spec: BackendSpec::Disk {
            path: PathBuf::from(parts[0]),
            ro,
        },
    })
}

/// Parses a MAC `aa:bb:cc:dd:ee:ff` (unicast only).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut n = 0;
    for (i, p) in s.split(':').enumerate() {
        if i >= 6 || p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
        n += 1;
    }
    (n == 6 && m[0] & 1 == 0 && m != [0; 6]).then_some(m)
}

/// Parses `GUEST=tap:NAME[,mac=aa:bb:cc:dd:ee:ff]`.
pub fn parse_net(s: &str) -> Result<Binding, BindError> {
    let (guest, parts) = split("--net", s)?;
    let bad = |why: String| BindError::Syntax {
        what: "--net",
        text: s.to_string(),
        why,
    };
    let tap = parts[0]
        .strip_prefix("tap:")
        .ok_or_else(|| bad("expected tap:NAME".into()))?;
    if tap.is_empty() || tap.len() >= libc::IFNAMSIZ {
        return Err(bad(format!(
            "a TAP name must be 1 to {} characters",
            libc::IFNAMSIZ - 1
        )));
    }
    let mut mac = None;
    for p in &parts[1..] {
        match p.split_once('=') {
            Some(("mac", v)) => {
                mac = Some(parse_mac(v).ok_or_else(|| {
                    bad(format!(
                        "bad MAC '{v}': use six hex pairs like 52:54:00:12:34:56, unicast"
                    ))
                })?)
            }
            _ => return Err(bad(format!("unknown option '{p}' (only mac=...)"))),
        }
    }
    Ok(Binding {
        guest: guest.to_string(),
        spec: BackendSpec::Net {
            tap: tap.to_string(),
            mac,
        },
    })
}

/// The MAC a guest gets when the operator names none: locally
/// administered, derived from the guest name.
pub fn derived_mac(guest: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in guest.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

/// An opened backend.
#[derive(Debug, Clone)]
pub enum Backend {
    /// An image file, opened and locked.
    Disk {
        /// The file.
        file: Arc<File>,
        /// Its path (for status).
        path: String,
        /// Read-only.
        ro: bool,
        /// Size in bytes (the disk size).
        size: u64,
    },
    /// A TAP, opened.
    Net {
        /// The TAP file.
        tap: Arc<File>,
        /// Interface name.
        name: String,
        /// The guest's MAC.
        mac: [u8; 6],
    },
}

impl Backend {
    /// Virtio device id.
    pub fn device_type(&self) -> u32 {
        match self {
            Backend::Disk { .. } => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Backend::Net { .. } => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
        }
    }
}

fn open_disk(guest: &str, path: &std::path::Path, ro: bool) -> Result<Backend, BindError> {
    let err = |why: String| BindError::Image {
        guest: guest.to_string(),
        path: path.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot be read: {e}")))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    if !ro && meta.permissions().mode() & 0o222 == 0 {
        return Err(err(
            "is a read-only file; bind it with ',ro' or make it writable".into(),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!ro)
        .open(path)
        .map_err(|e| {
            if !ro && e.raw_os_error() == Some(libc::EROFS) {
                err("is on a read-only file system; bind it with ',ro'".into())
            } else {
                err(format!("cannot be opened: {e}"))
            }
        })?;
    let size = meta.len();
    if size == 0 || !size.is_multiple_of(crate::devices::blk::SECTOR) {
        return Err(err(format!(
            "its size ({size} bytes) must be a non-zero multiple of 512"
        )));
    }
    let op = if ro { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        return Err(err(
            "is in use by another process (it holds a lock on it)".into()
        ));
    }
    Ok(Backend::Disk {
        file: Arc::new(file),
        path: path.display().to_string(),
        ro,
        size,
    })
}

/// Bindings, opened, by guest name, in command-line order.
#[derive(Debug, Default, Clone)]
pub struct Bindings {
    by_guest: HashMap<String, Vec<Backend>>,
}

impl Bindings {
    /// Opens every binding; `guests` are the names this VMM creates.
    pub fn open(list: &[Binding], guests: &[String]) -> Result<Bindings, BindError> {
        let mut by_guest: HashMap<String, Vec<Backend>> = HashMap::new();
        for b in list {
            if !guests.contains(&b.guest) {
                let names = if guests.is_empty() {
                    "no nested guests".to_string()
                } else {
                    guests.join(", ")
                };
                return Err(BindError::NoSuchGuest(b.guest.clone(), names));
            }
            let be = match &b.spec {
                BackendSpec::Disk { path, ro } => open_disk(&b.guest, path, *ro)?,
                BackendSpec::Net { tap, mac } => {
                    let f = crate::devices::tap::open(tap).map_err(|why| BindError::Tap {
                        guest: b.guest.clone(),
                        tap: tap.clone(),
                        why,
                    })?;
                    Backend::Net {
                        tap: Arc::new(f),
                        name: tap.clone(),
                        mac: mac.unwrap_or_else(|| derived_mac(&b.guest)),
                    }
                }
            };
            let v = by_guest.entry(b.guest.clone()).or_default();
            if v.len() >= vmbeam_abi::l2::MAX_DEVICES {
                return Err(BindError::TooMany(
                    b.guest.clone(),
                    vmbeam_abi::l2::MAX_DEVICES,
                ));
            }
            v.push(be);
        }
        Ok(Bindings { by_guest })
    }

    /// Backends bound to `guest`.
    pub fn for_guest(&self, guest: &str) -> &[Backend] {
        self.by_guest
            .get(guest)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// Whether any guest has a disk.
    pub fn has_disks(&self) -> bool {
        self.by_guest
            .values()
            .flatten()
            .any(|b| matches!(b, Backend::Disk { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse() {
        let b = parse_disk("l2-0=/tmp/x.img,ro").unwrap();
        assert_eq!(b.guest, "l2-0");
        assert_eq!(
            b.spec,
            BackendSpec::Disk {
                path: "/tmp/x.img".into(),
                ro: true
            }
        );
        assert!(parse_disk("l2-0").is_err());
        assert!(parse_disk("l2-0=/x,rw").is_err());
        let n = parse_net("l2-1=tap:vt0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(
            n.spec,
            BackendSpec::Net {
                tap: "vt0".into(),
                mac: Some([0x52, 0x54, 0, 0, 0, 1])
            }
        );
        assert!(parse_net("l2-1=vt0").is_err());
        assert!(parse_net("l2-1=tap:vt0,mac=01:00:00:00:00:01").is_err());
        assert!(parse_net("l2-1=tap:vt0,mac=zz:00:00:00:00:01").is_err());
        assert!(parse_net("l2-1=tap:vt0,mac=52:54:00:00:00").is_err());
        assert_eq!(derived_mac("l2-1"), derived_mac("l2-1"));
        assert_ne!(derived_mac("l2-1"), derived_mac("l2-2"));
    }

    #[test]
    fn bad_images_are_refused() {
        let dir = std::env::temp_dir().join(format!("vmbeam-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g = vec!["l2-0".to_string()];
        let missing = parse_disk(&format!("l2-0={}/none.img", dir.display())).unwrap();
        let e = Bindings::open(&[missing], &g).unwrap_err().to_string();
        assert!(e.contains("cannot be read"), "{e}");
        let p = dir.join("ro.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let rw = parse_disk(&format!("l2-0={}", p.display())).unwrap();
        let e = Bindings::open(&[rw], &g).unwrap_err().to_string();
        assert!(e.contains("read-only file"), "{e}");
        let ro = parse_disk(&format!("l2-0={},ro", p.display())).unwrap();
        assert!(Bindings::open(std::slice::from_ref(&ro), &g).is_ok());
        let other = Binding {
            guest: "l2-7".into(),
            ..ro
        };
        let e = Bindings::open(&[other], &g).unwrap_err().to_string();
        assert!(e.contains("does not create"), "{e}");
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = Bindings::open(
            &[parse_disk(&format!("l2-0={}", odd.display())).unwrap()],
            &g,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of 512"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
