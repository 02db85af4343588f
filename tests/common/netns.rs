//! A network namespace with a TAP in it, for tests and benchmarks of the
//! virtio-net device: the TAP is created in the test's namespace (where the
//! VMM opens it by name), then moved into a namespace of its own and
//! addressed there, so the test's traffic never touches the machine's own
//! interfaces or routes. A Drop guard deletes both, even when the test
//! fails.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The host side's address in the namespace.
pub const HOST_IP: &str = "10.99.0.1";
/// netecho's address.
pub const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
/// Prefix length of the test network.
pub const PREFIX: u64 = 24;

/// netecho's `param0` for [`GUEST_IP`]/[`PREFIX`].
pub fn netecho_param() -> u64 {
    (PREFIX << 32) | u32::from_be_bytes(GUEST_IP) as u64
}

/// netecho's address as text.
pub fn guest_ip() -> String {
    let [a, b, c, d] = GUEST_IP;
    format!("{a}.{b}.{c}.{d}")
}

/// Why namespaces and TAPs cannot be made here, or `None`.
pub fn unusable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces and TAPs need root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for tool in [["ip", "-V"], ["ping", "-V"]] {
        let ok = Command::new(tool[0])
            .arg(tool[1])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!(
                "`{}` is missing (Debian packages iproute2 and iputils-ping)",
                tool[0]
            ));
        }
    }
    None
}

/// True if `what` can make namespaces, TAPs and nested guests here;
/// otherwise prints why and returns false (or panics under
/// `VMBEAM_REQUIRE_KVM=1`).
pub fn net_or_skip(what: &str) -> bool {
    if !super::kvm_or_skip(what) {
        return false;
    }
    match unusable() {
        None => true,
        Some(reason) if super::kvm::kvm_required() => {
            panic!("{what}: VMBEAM_REQUIRE_KVM=1 but the network test cannot run: {reason}")
        }
        Some(reason) => {
            println!("SKIP {what}: {reason}");
            false
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A TAP (first in the test's namespace) and the namespace it moves to.
pub struct TapNs {
    /// Namespace name.
    pub ns: String,
    /// TAP name.
    pub tap: String,
}

impl TapNs {
    /// Creates the TAP `vb<pid><tag>` and names the namespace after it.
    pub fn create(tag: &str) -> Result<TapNs, String> {
        let tap = format!("vb{:x}{tag}", std::process::id());
        assert!(tap.len() < 16, "TAP name {tap} too long");
        let t = TapNs {
            ns: format!("vmbeam-test-{tap}"),
            tap,
        };
        // Leftovers of an earlier run with the same pid.
        let _ = ip(&["netns", "del", &t.ns]);
        let _ = ip(&["link", "del", &t.tap]);
        ip(&["tuntap", "add", "dev", &t.tap, "mode", "tap"])?;
        ip(&["netns", "add", &t.ns])?;
        Ok(t)
    }

    /// Moves the TAP into the namespace (an open TAP keeps working), gives
    /// it [`HOST_IP`] and brings it up.
    pub fn move_in(&self) -> Result<(), String> {
        ip(&["link", "set", &self.tap, "netns", &self.ns])?;
        let cidr = format!("{HOST_IP}/{PREFIX}");
        ip(&["-n", &self.ns, "addr", "add", &cidr, "dev", &self.tap])?;
        ip(&["-n", &self.ns, "link", "set", &self.tap, "up"])?;
        ip(&["-n", &self.ns, "link", "set", "lo", "up"])
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// A TCP connection made from inside the namespace (a socket stays in
    /// the namespace it was made in; the calling thread does not move).
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        in_ns(&self.ns, || TcpStream::connect_timeout(&to, timeout))
    }
}

/// Runs `f` on a short-lived thread inside namespace `ns`: the sockets it
/// makes belong to `ns` and may be used from any thread afterwards.
pub fn in_ns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)?;
            // SAFETY: setns on a namespace file we opened; it changes
            // only this short-lived thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// Two namespaces joined by a veth pair, `10.98.0.1` in the first and
/// `10.98.0.2` in the second: the host talking to itself over a virtual
/// wire, to compare a nested guest's network with. Drop deletes both.
pub struct VethPair {
    /// The first namespace.
    pub a: String,
    /// The second namespace.
    pub b: String,
}

impl VethPair {
    /// Address of the first end.
    pub const A_IP: &'static str = "10.98.0.1";
    /// Address of the second end.
    pub const B_IP: &'static str = "10.98.0.2";

    /// Makes the namespaces `vmbeam-<pid><tag>a`/`b` and the wire.
    pub fn create(tag: &str) -> Result<VethPair, String> {
        let id = format!("{:x}{tag}", std::process::id());
        let v = VethPair {
            a: format!("vmbeam-{id}a"),
            b: format!("vmbeam-{id}b"),
        };
        let _ = ip(&["netns", "del", &v.a]);
        let _ = ip(&["netns", "del", &v.b]);
        ip(&["netns", "add", &v.a])?;
        ip(&["netns", "add", &v.b])?;
        let (ea, eb) = (format!("va{id}"), format!("vb{id}"));
        ip(&[
            "-n", &v.a, "link", "add", &ea, "type", "veth", "peer", "name", &eb, "netns", &v.b,
        ])?;
        for (ns, dev, addr) in [(&v.a, &ea, Self::A_IP), (&v.b, &eb, Self::B_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(v)
    }

    /// A command run inside the first namespace.
    pub fn exec_a(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.a, program]);
        c
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.tap]);
    }
}

/// ping's `rtt min/avg/max/mdev` numbers, in ms.
pub fn ping_rtt(text: &str) -> Option<(f64, f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("rtt "))?;
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)?
        .split_whitespace()
        .next()?
        .split('/')
        .filter_map(|n| n.parse().ok())
        .collect();
    (nums.len() >= 3).then(|| (nums[0], nums[1], nums[2]))
}

/// `N packets transmitted, M received` (and `+D duplicates`) of ping's
/// summary.
pub fn ping_summary(text: &str) -> Option<(u64, u64, u64)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let num_before = |key: &str| {
        line.split(',').find(|p| p.contains(key)).and_then(|p| {
            p.split_whitespace()
                .find_map(|w| w.trim_start_matches('+').parse().ok())
        })
    };
    Some((
        num_before("transmitted")?,
        num_before("received")?,
        num_before("duplicates").unwrap_or(0),
    ))
}

/// The `icmp_seq` of every answer ping printed (duplicates included).
pub fn answered_seqs(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}
