//! Fuzz harnesses for the parts of L0 that read untrusted bytes, shared by
//! the libFuzzer targets in `fuzz/fuzz_targets/` (run by `cargo fuzz`) and
//! by the stable replay test `tests/fuzz_corpus.rs` (run by `cargo test`,
//! which includes this file with `#[path]`).
//!
//! Each harness takes arbitrary bytes and panics only when an invariant is
//! broken: a decoder or check that panics, or one that accepts what an
//! independent oracle (written here with `u128` arithmetic and brute force)
//! says must be refused, or the other way round.
//!
//! | target | what it feeds |
//! |---|---|
//! | `hypercall_page` | `from_bytes::<HypercallPage>`, then the pure argument checks of the op it names (`vmbeam_vmm::host::names::check_name`, `vmbeam_vmm::hypercall::handlers::{console_len, check_map_args, nested_memory_region, check_fill_args}`) |
//! | `vm_map_sequence` | a sequence of VM_MAP / FILL_PATTERN calls against a model guest hypervisor with three nested VMs, built from the same checks; after each call the isolation invariants must hold |
//! | `guest_msg` | `from_bytes::<GuestMsg>` + `GuestMsg::validate`, compared with an oracle |
//! | `api_request` | `vmbeam_vmm::api::parse_request`, then the JSON bodies the API accepts |
//! | `virtio_queue` | a virtio-blk device (`vmbeam_vmm::devices`) programmed by a driver from the input: queue size, ring addresses and the contents of guest memory (descriptor table, rings, requests), then notified; bad sizes, descriptors outside memory, loops and oversized chains must end in an error status or DEVICE_NEEDS_RESET, never a panic, and the disk never grows |
//! | `virtio_net` | a virtio-net device over a datagram socket pair standing in for its TAP, with its receive or transmit queue programmed by a driver from the input and frames waiting on the "TAP" side; the same bad-driver cases must end in a dropped frame, an error count or DEVICE_NEEDS_RESET, never a panic; a transmitted frame is what the chain held after its header, and no frame is delivered twice |
//! | `wire_frame` | `vmbeam_vmm::migration::wire::read_frame` on a stream of migration frames (what `run --listen` reads from the network), then `parse_pages` |

use vmbeam_abi::handover::{kind, GuestMsg, MsgError, MsgHeader, UartState, MAX_GUEST_RANGES};
use vmbeam_abi::handover::{HANDOVER_VERSION, MAX_NESTED_VCPUS, MSG_MAGIC};
use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE};
use vmbeam_abi::state::VcpuState;
use vmbeam_abi::NAME_LEN;
use vmbeam_vmm::api;
use vmbeam_vmm::host::memory::RegionKind;
use vmbeam_vmm::host::names::check_name;
use vmbeam_vmm::hypercall::handlers::{
    check_fill_args, check_map_args, console_len, nested_memory_region, ranges_overlap,
};

/// A harness: takes any bytes, panics only on a broken invariant.
pub type Harness = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/`) and harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("hypercall_page", hypercall_page),
    ("vm_map_sequence", vm_map_sequence),
    ("guest_msg", guest_msg),
    ("api_request", api_request),
    ("wire_frame", wire_frame),
    ("virtio_queue", virtio_queue),
    ("virtio_net", virtio_net),
];

/// Most slots of a nested VM (as `vmbeam_vmm::nesting::nested::MAX_SLOTS`).
const MAX_SLOTS: usize = vmbeam_vmm::nesting::nested::MAX_SLOTS;
/// Highest nested guest-physical address (as `vmbeam_vmm::nesting::nested::MAX_L2_GPA`).
const MAX_L2_GPA: u64 = vmbeam_vmm::nesting::nested::MAX_L2_GPA;

/// `T` from the start of `data`, zero-padded if `data` is short.
fn decode_padded<T: vmbeam_abi::Pod>(data: &[u8]) -> T {
    let size = core::mem::size_of::<T>();
    match vmbeam_abi::from_bytes::<T>(data) {
        Some(v) => {
            assert!(data.len() >= size);
            assert_eq!(vmbeam_abi::as_bytes(&v), &data[..size], "lossy decode");
            v
        }
        None => {
            assert!(data.len() < size, "from_bytes refused a long enough buffer");
            let mut raw = vec![0u8; size];
            raw[..data.len()].copy_from_slice(data);
            vmbeam_abi::from_bytes(&raw).expect("padded buffer")
        }
    }
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// `[a, a + len)` as `u128`, which cannot wrap.
fn span(a: u64, len: u64) -> (u128, u128) {
    (a as u128, a as u128 + len as u128)
}

fn is_nested_memory(k: &RegionKind) -> bool {
    matches!(k, RegionKind::Pool | RegionKind::Grant { .. })
}

/// Oracle of `nested_memory_region`: the first region that holds the whole
/// range decides; it must be pool or grant memory.
fn oracle_region(regions: &[(u64, u64, RegionKind)], gpa: u64, len: u64) -> Result<usize, Status> {
    let (s, e) = span(gpa, len);
    if e > u64::MAX as u128 {
        return Err(Status::OutOfRange);
    }
    for (i, (r, size, k)) in regions.iter().enumerate() {
        let (rs, re) = span(*r, *size);
        if s >= rs && e <= re && re <= u64::MAX as u128 {
            return if is_nested_memory(k) {
                Ok(i)
            } else {
                Err(Status::OutOfRange)
            };
        }
    }
    Err(Status::OutOfRange)
}

/// The regions of a host VM as L0 builds them, with pool and grant sizes
/// taken from the input (any value: the checks must hold for every layout).
fn model_regions(pool: u64, grant: u64) -> Vec<(u64, u64, RegionKind)> {
    vec![
        (0, 32 << 20, RegionKind::Ram),
        (
            layout::CHANNEL_BASE,
            layout::CHANNEL_SIZE,
            RegionKind::Channel,
        ),
        (layout::POOL_BASE, pool, RegionKind::Pool),
        (
            layout::GRANT_BASE,
            grant,
            RegionKind::Grant {
                guest: "l2-0".into(),
            },
        ),
        (
            layout::GRANT_BASE.wrapping_add(grant),
            EXTENT_SIZE * 4,
            RegionKind::Grant {
                guest: "l2-1".into(),
            },
        ),
    ]
}

fn find_region(regions: &[(u64, u64, RegionKind)], gpa: u64, len: u64) -> Result<usize, Status> {
    let got = nested_memory_region(regions.iter().map(|(g, s, k)| (*g, *s, k)), gpa, len);
    assert_eq!(
        got,
        oracle_region(regions, gpa, len),
        "nested_memory_region({gpa:#x}, {len:#x}) disagrees with the oracle"
    );
    got
}

fn check_map_oracle(l1: u64, l2: u64, len: u64) -> Result<u64, Status> {
    let got = check_map_args(l1, l2, len);
    let want = if len == 0 {
        Err(Status::BadArg)
    } else if [l1, l2, len].iter().any(|v| !v.is_multiple_of(EXTENT_SIZE)) {
        Err(Status::Misaligned)
    } else if span(l1, len).1 > u64::MAX as u128 {
        Err(Status::OutOfRange)
    } else {
        Ok(l1 + len)
    };
    assert_eq!(got, want, "check_map_args({l1:#x}, {l2:#x}, {len:#x})");
    got
}

fn check_fill_oracle(gpa: u64, len: u64) {
    let got = check_fill_args(gpa, len);
    let want = if !gpa.is_multiple_of(8) || !len.is_multiple_of(8) {
        Err(Status::Misaligned)
    } else if len == 0 {
        Err(Status::BadArg)
    } else if span(gpa, len).1 > u64::MAX as u128 {
        Err(Status::OutOfRange)
    } else {
        Ok(gpa + len)
    };
    assert_eq!(got, want, "check_fill_args({gpa:#x}, {len:#x})");
}

/// Target `hypercall_page`: one hypercall page as L1 leaves it.
pub fn hypercall_page(data: &[u8]) {
    let page: HypercallPage = decode_padded(data);
    if let Some(s) = Status::from_i32(page.status) {
        assert_eq!(s as i32, page.status);
    }
    let a = page.args;
    match page.op {
        OP_VM_CREATE => {
            let mut raw = [0u8; NAME_LEN];
            raw.copy_from_slice(&page.data[..NAME_LEN]);
            match check_name(&raw) {
                Ok(n) => {
                    assert!(!n.is_empty() && n.len() <= NAME_LEN);
                    assert!(n
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
                    assert_eq!(vmbeam_abi::name_from_bytes(&raw), Some(n));
                }
                Err(s) => assert_eq!(s, Status::BadArg),
            }
        }
        OP_CONSOLE_WRITE => match console_len(a[1]) {
            Ok(n) => {
                assert_eq!(n as u64, a[1]);
                assert!(page.data.get(..n).is_some());
            }
            Err(s) => {
                assert_eq!(s, Status::TooMany);
                assert!(a[1] > DATA_LEN as u64);
            }
        },
        OP_VM_MAP if check_map_oracle(a[1], a[2], a[3]).is_ok() => {
            find_region(&model_regions(a[4], a[5]), a[1], a[3]).ok();
        }
        OP_FILL_PATTERN => check_fill_oracle(a[1], a[2]),
        _ => {}
    }
    // Whatever the op, the checks must not panic on these words.
    let _ = check_map_args(a[0], a[1], a[2]);
    let _ = check_fill_args(a[6], a[7]);
    let _ = console_len(a[7]);
    let _ = find_region(&model_regions(a[6], a[7]), a[2], a[3]);
}

/// One mapped slot of the model: L1 range, L2 range.
#[derive(Clone, Copy, Debug)]
struct Slot {
    l1: u64,
    l2: u64,
    len: u64,
}

/// Bases an encoded L1 address is built from.
const BASES: [u64; 8] = [
    layout::POOL_BASE,
    layout::GRANT_BASE,
    0,
    layout::CHANNEL_BASE,
    layout::POOL_BASE - EXTENT_SIZE,
    layout::GRANT_BASE - EXTENT_SIZE,
    0u64.wrapping_sub(EXTENT_SIZE * 4),
    layout::POOL_BASE + (64 << 20),
];

/// The model's VM_MAP: the production checks in the order `vm_map` and
/// `NestedVm::map` apply them.
fn model_map(
    regions: &[(u64, u64, RegionKind)],
    vms: &mut [Vec<Slot>],
    handle: usize,
    l1: u64,
    l2: u64,
    len: u64,
) -> Result<(), Status> {
    let l1_end = check_map_oracle(l1, l2, len)?;
    if handle >= vms.len() {
        return Err(Status::NoSuchHandle);
    }
    find_region(regions, l1, len)?;
    for (h, other) in vms.iter().enumerate() {
        if h != handle
            && other
                .iter()
                .any(|s| ranges_overlap(l1, l1_end, s.l1, s.l1 + s.len))
        {
            return Err(Status::Overlap);
        }
    }
    let own = &mut vms[handle];
    if own
        .iter()
        .any(|s| ranges_overlap(l1, l1_end, s.l1, s.l1 + s.len))
    {
        return Err(Status::Overlap);
    }
    if own.len() >= MAX_SLOTS {
        return Err(Status::TooMany);
    }
    let l2_end = l2.checked_add(len).ok_or(Status::OutOfRange)?;
    if l2_end > MAX_L2_GPA {
        return Err(Status::OutOfRange);
    }
    if own
        .iter()
        .any(|s| ranges_overlap(l2, l2_end, s.l2, s.l2 + s.len))
    {
        return Err(Status::Overlap);
    }
    own.push(Slot { l1, l2, len });
    Ok(())
}

/// Oracle of the whole VM_MAP decision, from the isolation rules alone.
fn map_allowed(
    regions: &[(u64, u64, RegionKind)],
    vms: &[Vec<Slot>],
    handle: usize,
    l1: u64,
    l2: u64,
    len: u64,
) -> bool {
    let (s1, e1) = span(l1, len);
    let (s2, e2) = span(l2, len);
    let aligned = [l1, l2, len].iter().all(|v| v % EXTENT_SIZE == 0);
    let owned = regions.iter().find(|(g, sz, _)| {
        let (rs, re) = span(*g, *sz);
        s1 >= rs && e1 <= re && re <= u64::MAX as u128
    });
    let owned = e1 <= u64::MAX as u128 && owned.is_some_and(|(_, _, k)| is_nested_memory(k));
    let free_l1 = vms.iter().flatten().all(|s| {
        let (a, b) = span(s.l1, s.len);
        e1 <= a || b <= s1
    });
    let ok_vm = handle < vms.len();
    let free_l2 = ok_vm
        && vms[handle].iter().all(|s| {
            let (a, b) = span(s.l2, s.len);
            e2 <= a || b <= s2
        });
    len > 0
        && aligned
        && ok_vm
        && owned
        && free_l1
        && vms[handle].len() < MAX_SLOTS
        && e2 <= MAX_L2_GPA as u128
        && free_l2
}

/// The isolation invariants of a guest hypervisor's nested VMs.
fn check_isolation(regions: &[(u64, u64, RegionKind)], vms: &[Vec<Slot>]) {
    let all: Vec<(usize, Slot)> = vms
        .iter()
        .enumerate()
        .flat_map(|(h, v)| v.iter().map(move |s| (h, *s)))
        .collect();
    for (h, s) in &all {
        assert!(vms[*h].len() <= MAX_SLOTS);
        assert!(span(s.l2, s.len).1 <= MAX_L2_GPA as u128, "{s:?}");
        assert!(
            oracle_region(regions, s.l1, s.len).is_ok(),
            "slot {s:?} of VM {h} is not pool or grant memory"
        );
        for (h2, t) in &all {
            if std::ptr::eq(s, t) {
                continue;
            }
            let (a, b) = span(s.l1, s.len);
            let (c, d) = span(t.l1, t.len);
            assert!(b <= c || d <= a, "L1 pages shared: {h}:{s:?} {h2}:{t:?}");
            if h == h2 {
                let (a, b) = span(s.l2, s.len);
                let (c, d) = span(t.l2, t.len);
                assert!(b <= c || d <= a, "L2 overlap in VM {h}: {s:?} {t:?}");
            }
        }
    }
}

/// Target `vm_map_sequence`: 9-byte records, each one VM_MAP or
/// FILL_PATTERN call against a model guest hypervisor with three nested VMs.
///
/// Record `[handle, flags, o, a, b, c, d, e, f]`: `handle` 0–2 name the VMs
/// (others are bogus); the L1 address is `BASES[flags & 7] + a` extents
/// (plus `b` pages if `flags & 8`), the L2 address `c` extents (times 4096
/// if `flags & 16`) plus `o` bytes, the length `d` extents (plus `e` bytes
/// if `flags & 32`; a near-`u64::MAX` length of `f` extents below 2^64 if
/// `flags & 64`); `flags & 128` makes it a FILL_PATTERN of the L2 range.
pub fn vm_map_sequence(data: &[u8]) {
    let regions = model_regions(64 << 20, 16 << 20);
    let mut vms: Vec<Vec<Slot>> = vec![Vec::new(); 3];
    for rec in data.chunks(9) {
        let b = |i: usize| rec.get(i).copied().unwrap_or(0) as u64;
        let flags = b(1);
        let mut l1 = BASES[(flags & 7) as usize].wrapping_add(b(3) * EXTENT_SIZE);
        if flags & 8 != 0 {
            l1 = l1.wrapping_add(b(4) << 12);
        }
        let mut l2 = b(5) * EXTENT_SIZE;
        if flags & 16 != 0 {
            l2 = l2.wrapping_mul(4096);
        }
        l2 = l2.wrapping_add(b(2));
        let mut len = b(6) * EXTENT_SIZE;
        if flags & 32 != 0 {
            len = len.wrapping_add(b(7));
        }
        if flags & 64 != 0 {
            len = 0u64.wrapping_sub(b(8) * EXTENT_SIZE);
        }
        if flags & 128 != 0 {
            check_fill_oracle(l2, len);
            continue;
        }
        let handle = b(0) as usize;
        let allowed = map_allowed(&regions, &vms, handle, l1, l2, len);
        let got = model_map(&regions, &mut vms, handle, l1, l2, len);
        assert_eq!(
            got.is_ok(),
            allowed,
            "VM_MAP(vm {handle}, l1 {l1:#x}, l2 {l2:#x}, len {len:#x}) -> {got:?}, \
             but the isolation rules say {allowed}; slots {vms:?}"
        );
        check_isolation(&regions, &vms);
    }
}

/// Oracle of `GuestMsg::validate`, in the same order of checks.
fn oracle_validate(m: &GuestMsg, base: u64, size: u64) -> Result<(), MsgError> {
    let h = &m.hdr;
    if h.magic != MSG_MAGIC
        || h.version != HANDOVER_VERSION
        || h.kind != kind::GUEST
        || h.len as usize != core::mem::size_of::<GuestMsg>()
    {
        return Err(MsgError::BadHeader);
    }
    let n = m.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if n == 0 || core::str::from_utf8(&m.name[..n]).is_err() {
        return Err(MsgError::BadName);
    }
    if m.vcpus == 0 || m.vcpus as usize > MAX_NESTED_VCPUS {
        return Err(MsgError::BadVcpus);
    }
    let count = m.n_ranges as usize;
    if count == 0 || count > MAX_GUEST_RANGES {
        return Err(MsgError::BadRangeCount);
    }
    let (ws, we) = span(base, size);
    if we > u64::MAX as u128 {
        return Err(MsgError::BadRange);
    }
    let ranges = &m.ranges[..count];
    let mut total: u128 = 0;
    for (i, r) in ranges.iter().enumerate() {
        let (s, e) = span(r.succ_gpa, r.len);
        let (s2, e2) = span(r.l2_gpa, r.len);
        let ext = EXTENT_SIZE as u128;
        let wraps = e > u64::MAX as u128 || e2 > u64::MAX as u128;
        if wraps
            || r.len == 0
            || !(r.len as u128).is_multiple_of(ext)
            || !s.is_multiple_of(ext)
            || !s2.is_multiple_of(ext)
            || s < ws
            || e > we
        {
            return Err(MsgError::BadRange);
        }
        for o in &ranges[..i] {
            let (os, oe) = span(o.succ_gpa, o.len);
            let (os2, oe2) = span(o.l2_gpa, o.len);
            if (s < oe && os < e) || (s2 < oe2 && os2 < e2) {
                return Err(MsgError::BadRange);
            }
        }
        total += r.len as u128;
    }
    if total != m.mem_bytes as u128 {
        return Err(MsgError::SizeMismatch);
    }
    Ok(())
}

/// Target `guest_msg`: a GUEST message as the successor reads it from the
/// channel, validated against the real grant window and against a window
/// taken from the 16 bytes after the message (if any).
pub fn guest_msg(data: &[u8]) {
    let msg: GuestMsg = decode_padded(data);
    let size = core::mem::size_of::<GuestMsg>();
    // The real window, one from the input, and windows one byte off the
    // span the ranges cover (to probe both ends of the window check).
    let n = (msg.n_ranges as usize).min(MAX_GUEST_RANGES);
    let lo = msg.ranges[..n]
        .iter()
        .map(|r| r.succ_gpa)
        .min()
        .unwrap_or(0);
    let hi = msg.ranges[..n]
        .iter()
        .map(|r| r.succ_gpa.wrapping_add(r.len))
        .max()
        .unwrap_or(0);
    let cover = hi.wrapping_sub(lo);
    let windows = [
        (layout::GRANT_BASE, layout::GRANT_SIZE),
        (u64_at(data, size), u64_at(data, size + 8)),
        (lo, cover),
        (lo.wrapping_add(1), cover),
        (lo.wrapping_sub(1), cover),
        (lo, cover.wrapping_sub(1)),
    ];
    for (base, len) in windows {
        let got = msg.validate(base, len);
        assert_eq!(
            got,
            oracle_validate(&msg, base, len),
            "GuestMsg::validate(window {base:#x}+{len:#x}) disagrees with the oracle"
        );
        if got.is_ok() {
            // What the successor then relies on.
            assert!(vmbeam_abi::name_from_bytes(&msg.name).is_some());
            let n = msg.n_ranges as usize;
            assert!((1..=MAX_GUEST_RANGES).contains(&n));
            assert!((1..=MAX_NESTED_VCPUS as u32).contains(&msg.vcpus));
            let sum: u128 = msg.ranges[..n].iter().map(|r| r.len as u128).sum();
            assert_eq!(sum, msg.mem_bytes as u128);
            for r in &msg.ranges[..n] {
                assert!(span(r.succ_gpa, r.len).1 <= span(base, len).1);
                assert!(r.succ_gpa >= base);
            }
        }
    }
}

/// Target `api_request`: bytes a client sends on the API socket.
pub fn api_request(data: &[u8]) {
    match api::parse_request(data) {
        Ok(r) => {
            assert!(r.body.len() <= api::MAX_BODY);
            assert!(r.body.len() <= data.len());
            assert!(!r.method.is_empty() && !r.path.is_empty());
            assert!(!r.method.contains(char::is_whitespace));
            assert!(!r.path.contains(char::is_whitespace));
            assert!(r.method.len() < api::MAX_HEAD && r.path.len() < api::MAX_HEAD);
            assert!(!r.path.contains('?'));
            // The bodies the routes accept.
            if let Ok(q) = serde_json::from_str::<api::RejuvenateRequest>(&r.body) {
                if let Some(f) = q.fault {
                    let _ = api::parse_fault(&f);
                }
            }
            let _ = serde_json::from_str::<api::ChecksumRequest>(&r.body);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
    }
}

/// Target `wire_frame`: a TCP migration stream as the receiver reads it.
pub fn wire_frame(data: &[u8]) {
    use vmbeam_vmm::migration::wire::{self, Kind};
    let mut r = data;
    for _ in 0..64 {
        let before = r.len();
        match wire::read_frame(&mut r) {
            Ok((kind, payload)) => {
                assert!(payload.len() <= wire::MAX_PAYLOAD);
                assert_eq!(before - r.len(), 16 + payload.len(), "frame size");
                assert_eq!(
                    u32::from_le_bytes(data[data.len() - before + 12..][..4].try_into().unwrap()),
                    wire::crc32(&payload)
                );
                if kind == Kind::Pages {
                    if let Ok((_, _, bytes)) = wire::parse_pages(&payload) {
                        assert_eq!(bytes.len() + 12, payload.len());
                    } else {
                        assert!(payload.len() < 12);
                    }
                }
                if kind == Kind::Zero {
                    assert_eq!(wire::parse_range(&payload).is_ok(), payload.len() == 20);
                }
                if kind == Kind::Refuse {
                    assert!(wire::parse_reason(&payload).len() <= 3 * wire::MAX_REASON);
                }
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    }
}

/// Seed inputs, one file each under `fuzz/corpus/<target>/<name>`.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let page = |op: u32, args: &[u64], data: &[u8]| {
        let mut p = HypercallPage {
            op,
            ..Default::default()
        };
        p.args[..args.len()].copy_from_slice(args);
        p.data[..data.len()].copy_from_slice(data);
        vmbeam_abi::as_bytes(&p).to_vec()
    };
    let m = EXTENT_SIZE;
    let pool = layout::POOL_BASE;
    let hp = "hypercall_page";
    out.push((hp, "create-ok", page(OP_VM_CREATE, &[], b"l2-0")));
    out.push((hp, "create-bad-name", page(OP_VM_CREATE, &[], b"l2 0/\xff")));
    out.push((hp, "console", page(OP_CONSOLE_WRITE, &[1, 5], b"hello")));
    out.push((hp, "console-long", page(OP_CONSOLE_WRITE, &[1, 2049], b"")));
    let sizes = [64 << 20, 16 << 20];
    out.push((
        hp,
        "map-pool",
        page(OP_VM_MAP, &[1, pool, 0, 8 * m, sizes[0], sizes[1]], b""),
    ));
    out.push((
        hp,
        "map-ram",
        page(OP_VM_MAP, &[1, 0, 0, m, sizes[0], sizes[1]], b""),
    ));
    out.push((
        hp,
        "map-wrap",
        page(OP_VM_MAP, &[1, 0u64.wrapping_sub(m), 0, m], b""),
    ));
    out.push((
        hp,
        "map-grant",
        page(
            OP_VM_MAP,
            &[1, layout::GRANT_BASE, m, 2 * m, sizes[0], sizes[1]],
            b"",
        ),
    ));
    out.push((
        hp,
        "fill",
        page(OP_FILL_PATTERN, &[1, 0x40_0000, 4096, 7], b""),
    ));
    out.push((
        hp,
        "fill-misaligned",
        page(OP_FILL_PATTERN, &[1, 4, 4096], b""),
    ));
    out.push((
        hp,
        "short",
        page(OP_VM_MAP, &[1, pool, 0, m], b"")[..64].to_vec(),
    ));

    let vs = "vm_map_sequence";
    // Records [handle, flags, o, a, b, c, d, e, f], see `vm_map_sequence`.
    let recs = |r: &[[u8; 9]]| r.concat();
    out.push((
        vs,
        "two-vms",
        recs(&[[0, 0, 0, 0, 0, 0, 4, 0, 0], [1, 0, 0, 4, 0, 0, 4, 0, 0]]),
    ));
    out.push((
        vs,
        "share-pages",
        recs(&[[0, 0, 0, 0, 0, 0, 4, 0, 0], [1, 0, 0, 2, 0, 0, 4, 0, 0]]),
    ));
    out.push((
        vs,
        "ram-channel-grant",
        recs(&[
            [0, 2, 0, 1, 0, 0, 1, 0, 0],
            [0, 3, 0, 0, 0, 0, 1, 0, 0],
            [2, 1, 0, 0, 0, 0, 8, 0, 0],
        ]),
    ));
    out.push((
        vs,
        "misaligned-wrap-fill",
        recs(&[
            [0, 8, 0, 0, 3, 0, 1, 0, 0],
            [1, 64, 0, 0, 0, 0, 0, 0, 1],
            [2, 6, 0, 0, 0, 0, 8, 0, 0],
            [0, 0, 8, 0, 0, 0, 1, 0, 0],
            [0, 128, 4, 0, 0, 2, 1, 0, 0],
        ]),
    ));
    let mut many = Vec::new();
    for i in 0..18u8 {
        many.extend_from_slice(&[2, 0, 0, i, 0, i, 1, 0, 0]);
    }
    out.push((vs, "slot-limit", many));

    let gm = "guest_msg";
    let mut g = GuestMsg {
        hdr: MsgHeader::new(kind::GUEST, core::mem::size_of::<GuestMsg>()),
        index: 0,
        vcpus: 1,
        name: vmbeam_abi::name_to_bytes("l2-0"),
        mem_bytes: 8 * m,
        workload: 1,
        n_ranges: 2,
        seed: 1,
        moves: 0,
        exits: 0,
        uart: UartState::default(),
        ranges: [GrantRange::default(); MAX_GUEST_RANGES],
        state: [VcpuState::default(); MAX_NESTED_VCPUS],
    };
    g.ranges[0] = GrantRange {
        succ_gpa: layout::GRANT_BASE,
        l2_gpa: 0,
        len: 4 * m,
    };
    g.ranges[1] = GrantRange {
        succ_gpa: layout::GRANT_BASE + 4 * m,
        l2_gpa: 4 * m,
        len: 4 * m,
    };
    let bytes = |g: &GuestMsg| vmbeam_abi::as_bytes(g).to_vec();
    out.push((gm, "valid", bytes(&g)));
    let mut w = bytes(&g);
    w.extend_from_slice(&(layout::GRANT_BASE + 4 * m).to_le_bytes());
    w.extend_from_slice(&(u64::MAX).to_le_bytes());
    out.push((gm, "valid-odd-window", w));
    let mut o = g;
    o.ranges[1].l2_gpa = 2 * m;
    out.push((gm, "l2-overlap", bytes(&o)));
    let mut o = g;
    o.ranges[1].len = 0u64.wrapping_sub(m);
    out.push((gm, "wrapping-range", bytes(&o)));
    let mut o = g;
    o.n_ranges = 17;
    out.push((gm, "too-many-ranges", bytes(&o)));
    out.push((gm, "short", bytes(&g)[..100].to_vec()));

    let ar = "api_request";
    let http = |method: &str, path: &str, body: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    };
    out.push((ar, "status", http("GET", "/status", "")));
    out.push((
        ar,
        "rejuvenate",
        http(
            "POST",
            "/rejuvenate",
            r#"{"vm":"hv0","mode":"zero-copy","verify":true,"fault":"reject-first","timeout_secs":5}"#,
        ),
    ));
    out.push((
        ar,
        "checksum",
        http(
            "POST",
            "/checksum",
            r#"{"guest":"l2-0","gpa":4096,"len":64}"#,
        ),
    ));
    out.push((
        ar,
        "unknown-field",
        http("POST", "/rejuvenate", r#"{"bogus":1}"#),
    ));
    out.push((ar, "shutdown", http("PUT", "/shutdown", "")));
    let raw: [(&str, &[u8]); 4] = [
        (
            "huge-length",
            b"POST /rejuvenate HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
        ),
        (
            "bad-length",
            b"POST /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
        ),
        ("truncated", b"PUT /shutdown HTTP/1.1\r\nContent-Le"),
        ("binary", b"\x00\xff\r\n\r\n\x16\x03\x01"),
    ];
    for (name, r) in raw {
        out.push((ar, name, r.to_vec()));
    }

    let wf = "wire_frame";
    let frame = |kind, payload: &[u8]| {
        let mut v = Vec::new();
        vmbeam_vmm::migration::wire::write_frame(&mut v, kind, payload).unwrap();
        v
    };
    use vmbeam_vmm::migration::wire::{pages_payload, Kind};
    let hello = br#"{"line":"hv0","generation":1,"ram":33554432,"pool":67108864,"vcpus":1}"#;
    let mut stream = frame(Kind::Hello, hello);
    stream.extend(frame(Kind::Pages, &pages_payload(1, 4096, &[0x5a; 64])));
    stream.extend(frame(Kind::Done, b""));
    out.push((wf, "hello-pages-done", stream.clone()));
    let mut bad_crc = frame(Kind::Pages, &pages_payload(0, 0, &[1; 32]));
    bad_crc[12] ^= 1;
    out.push((wf, "bad-crc", bad_crc));
    let mut long = frame(Kind::State, b"{}");
    long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    out.push((wf, "too-long", long));
    out.push((wf, "short-pages", frame(Kind::Pages, &[1, 2, 3])));
    out.push((wf, "truncated", stream[..stream.len() - 5].to_vec()));
    virtio_queue_seeds(&mut out);
    virtio_net_seeds(&mut out);
    out
}

/// Guest memory of the `virtio_queue` harness: two RAM ranges with a gap.
const VQ_RAM: [(u64, usize); 2] = [(0x1000, 0x4000), (0x10000, 0x1000)];
/// Disk size of the `virtio_queue` harness.
const VQ_DISK: u64 = 64 * 512;
/// Bytes before the guest memory image in a `virtio_queue` input.
const VQ_HEADER: usize = 28;

/// The harness's disk: one temporary file per process.
fn vq_disk() -> std::sync::Arc<std::fs::File> {
    static DISK: std::sync::OnceLock<std::sync::Arc<std::fs::File>> = std::sync::OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vmbeam-fuzz-disk-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(VQ_DISK).unwrap();
        let _ = std::fs::remove_file(&p);
        std::sync::Arc::new(f)
    })
    .clone()
}

/// Input layout: queue size (u16), flags (bit 0 read-only disk, bit 1
/// driver asks for every feature bit), notifications (1 + n % 4),
/// descriptor table, avail ring and used ring addresses (u64 each; below
/// 2^63 they are folded into the harness's address range, else taken as
/// they are), then the image of guest memory (first range, then second).
pub fn virtio_queue(data: &[u8]) {
    let _ = virtio_queue_run(data);
}

/// What a `virtio_queue` input did: device status, requests served,
/// requests answered with an error, the reason of a needed reset.
#[derive(Debug)]
pub struct VqOutcome {
    /// Driver status register after the notifications.
    pub status: u32,
    /// Requests completed.
    pub requests: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Why the device needs a reset, if it does.
    pub reset_reason: Option<String>,
}

/// Runs one `virtio_queue` input, checks the invariants, and says what
/// happened (`None` for an input too short to program a queue).
pub fn virtio_queue_run(data: &[u8]) -> Option<VqOutcome> {
    use vmbeam_vmm::devices::blk::Blk;
    use vmbeam_vmm::devices::mmio::MmioDevice;
    use vmbeam_vmm::devices::queue::DeviceMemory;
    if data.len() < VQ_HEADER {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let size = u16::from_le_bytes([data[0], data[1]]);
    let flags = data[2];
    let notifies = 1 + data[3] % 4;
    let addr = |raw: u64| {
        if raw >> 63 != 0 {
            raw
        } else {
            0x1000 + raw % 0x11000
        }
    };
    let (desc, avail, used) = (addr(u64_at(4)), addr(u64_at(12)), addr(u64_at(20)));
    let mem = DeviceMemory::anonymous(&VQ_RAM).unwrap();
    let img = &data[VQ_HEADER..];
    let (a, b) = img.split_at(img.len().min(VQ_RAM[0].1));
    assert!(mem.write(VQ_RAM[0].0, a));
    assert!(mem.write(VQ_RAM[1].0, &b[..b.len().min(VQ_RAM[1].1)]));
    let disk = vq_disk();
    let blk = Blk::new(disk.clone(), "fuzz", flags & 1 != 0, VQ_DISK, "fuzz");
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let mut d = MmioDevice::new(0xd000_0000, 5, Box::new(blk), irq);
    let m = Some(&mem.mem);
    let w = |d: &mut MmioDevice, off: u64, v: u32| {
        d.write(off, &v.to_le_bytes(), m);
    };
    let r = |d: &mut MmioDevice, off: u64| {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut d, 0), 0x7472_6976, "magic");
    w(&mut d, 0x70, 1);
    w(&mut d, 0x70, 3);
    for sel in 0..2u32 {
        w(&mut d, 0x14, sel);
        let f = if flags & 2 != 0 {
            u32::MAX
        } else {
            r(&mut d, 0x10)
        };
        w(&mut d, 0x24, sel);
        w(&mut d, 0x20, f);
    }
    w(&mut d, 0x70, 0xb);
    w(&mut d, 0x30, 0);
    w(&mut d, 0x38, size as u32);
    for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        w(&mut d, off, a as u32);
        w(&mut d, off + 4, (a >> 32) as u32);
    }
    w(&mut d, 0x44, 1);
    w(&mut d, 0x70, 0xf);
    let bad_size = size == 0 || !size.is_power_of_two() || size > 128;
    for _ in 0..notifies {
        if d.write(0x50, &0u32.to_le_bytes(), m) {
            d.process(&mem.mem);
        }
    }
    let st = d.status();
    const NEEDS_RESET: u32 = 0x40;
    if bad_size {
        assert!(st & NEEDS_RESET != 0, "bad queue size {size} accepted");
    }
    if st & NEEDS_RESET != 0 {
        assert!(d.last_error.is_some());
    }
    if flags & 2 != 0 {
        // Feature bits the device does not offer: FEATURES_OK refused, so
        // DRIVER_OK fails and nothing is served.
        assert_eq!(st & 0x8, 0);
        assert_eq!(d.counters.requests + d.counters.errors, 0);
    }
    assert_eq!(disk.metadata().unwrap().len(), VQ_DISK, "the disk grew");
    let outcome = VqOutcome {
        status: st,
        requests: d.counters.requests,
        errors: d.counters.errors,
        reset_reason: (st & NEEDS_RESET != 0)
            .then(|| d.last_error.as_ref().map(|e| e.to_string()))
            .flatten(),
    };
    // A driver reset always brings the device back to a clean state.
    w(&mut d, 0x70, 0);
    assert_eq!(r(&mut d, 0x70), 0);
    assert_eq!(r(&mut d, 0x44), 0);
    Some(outcome)
}

fn virtio_queue_seeds(out: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    // Guest memory image (first range at 0x1000): descriptor table at
    // 0x1000, avail ring at 0x1100, used ring at 0x1200, request header
    // at 0x1400, data at 0x1600, status byte at 0x1800.
    let desc = |img: &mut [u8], i: usize, addr: u64, len: u32, fl: u16, next: u16| {
        let o = i * 16;
        img[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        img[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
        img[o + 12..o + 14].copy_from_slice(&fl.to_le_bytes());
        img[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
    };
    let input = |size: u16, flags: u8, kind: u32, f: &dyn Fn(&mut [u8])| {
        let mut img = vec![0u8; 0x900];
        desc(&mut img, 0, 0x1400, 16, 1, 1);
        desc(&mut img, 1, 0x1600, 512, 1 | 2, 2);
        desc(&mut img, 2, 0x1800, 1, 2, 0);
        img[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx
        img[0x400..0x404].copy_from_slice(&kind.to_le_bytes());
        img[0x408..0x410].copy_from_slice(&3u64.to_le_bytes()); // sector
        f(&mut img);
        let mut v = Vec::new();
        v.extend_from_slice(&size.to_le_bytes());
        v.push(flags);
        v.push(0);
        for a in [0u64, 0x100, 0x200] {
            v.extend_from_slice(&a.to_le_bytes());
        }
        v.extend_from_slice(&img);
        v
    };
    let vq = "virtio_queue";
    out.push((vq, "read-ok", input(16, 0, 0, &|_| {})));
    out.push((
        vq,
        "write-ok",
        input(16, 0, 1, &|i| desc(i, 1, 0x1600, 512, 1, 2)),
    ));
    out.push((
        vq,
        "write-read-only",
        input(16, 1, 1, &|i| desc(i, 1, 0x1600, 512, 1, 2)),
    ));
    out.push((vq, "get-id", input(16, 0, 8, &|_| {})));
    out.push((
        vq,
        "flush",
        input(16, 0, 4, &|i| desc(i, 0, 0x1400, 16, 1, 2)),
    ));
    out.push((
        vq,
        "loop",
        input(16, 0, 0, &|i| desc(i, 2, 0x1800, 1, 1 | 2, 1)),
    ));
    out.push((
        vq,
        "outside-memory",
        input(16, 0, 0, &|i| desc(i, 1, 0x8000, 512, 1 | 2, 2)),
    ));
    out.push((
        vq,
        "oversized",
        input(16, 0, 0, &|i| desc(i, 1, 0x1600, 2 << 20, 1 | 2, 2)),
    ));
    out.push((
        vq,
        "next-past-table",
        input(16, 0, 0, &|i| desc(i, 1, 0x1600, 512, 1 | 2, 99)),
    ));
    out.push((vq, "bad-size", input(3, 0, 0, &|_| {})));
    out.push((vq, "too-big-size", input(256, 0, 0, &|_| {})));
    out.push((
        vq,
        "avail-idx-jump",
        input(16, 0, 0, &|i| {
            i[0x102..0x104].copy_from_slice(&200u16.to_le_bytes())
        }),
    ));
    out.push((
        vq,
        "past-disk-end",
        input(16, 0, 0, &|i| {
            i[0x408..0x410].copy_from_slice(&64u64.to_le_bytes())
        }),
    ));
    out.push((vq, "all-features", input(16, 2, 0, &|_| {})));
}

/// Input layout of `virtio_net`: queue size (u16), flags (bit 0: program
/// the transmit queue instead of the receive queue; bit 1: driver asks for
/// every feature bit), frames waiting on the TAP side (`n % 4`, frame `i`
/// is 60 + 200·i bytes), then the three ring addresses and the guest
/// memory image as for `virtio_queue`.
pub fn virtio_net(data: &[u8]) {
    let _ = virtio_net_run(data);
}

/// What a `virtio_net` input did.
#[derive(Debug)]
pub struct VnOutcome {
    /// Driver status register after the notifications.
    pub status: u32,
    /// The device's counters.
    pub counters: vmbeam_vmm::devices::mmio::DeviceCounters,
    /// Frames that came out on the TAP side.
    pub sent: Vec<Vec<u8>>,
    /// Why the device needs a reset, if it does.
    pub reset_reason: Option<String>,
    /// Length of the first used element and the 80 bytes at 0x1400 (where
    /// the seeds put their first buffer).
    pub first_used: (u32, Vec<u8>),
}

/// Runs one `virtio_net` input, checks the invariants, says what happened.
pub fn virtio_net_run(data: &[u8]) -> Option<VnOutcome> {
    use std::os::unix::net::UnixDatagram;
    use vmbeam_vmm::devices::mmio::MmioDevice;
    use vmbeam_vmm::devices::net::Net;
    use vmbeam_vmm::devices::queue::DeviceMemory;
    if data.len() < VQ_HEADER {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let size = u16::from_le_bytes([data[0], data[1]]);
    let flags = data[2];
    let frames = data[3] % 4;
    let addr = |raw: u64| {
        if raw >> 63 != 0 {
            raw
        } else {
            0x1000 + raw % 0x11000
        }
    };
    let (desc, avail, used) = (addr(u64_at(4)), addr(u64_at(12)), addr(u64_at(20)));
    let mem = DeviceMemory::anonymous(&VQ_RAM).unwrap();
    let img = &data[VQ_HEADER..];
    let (a, b) = img.split_at(img.len().min(VQ_RAM[0].1));
    assert!(mem.write(VQ_RAM[0].0, a));
    assert!(mem.write(VQ_RAM[1].0, &b[..b.len().min(VQ_RAM[1].1)]));
    let (tap, wire) = UnixDatagram::pair().unwrap();
    tap.set_nonblocking(true).unwrap();
    wire.set_nonblocking(true).unwrap();
    let sent_in: Vec<Vec<u8>> = (0..frames as usize)
        .map(|i| (0..60 + 200 * i).map(|k| (k + i) as u8).collect())
        .collect();
    for f in &sent_in {
        wire.send(f).unwrap();
    }
    let tap = std::sync::Arc::new(std::fs::File::from(std::os::fd::OwnedFd::from(tap)));
    let net = Net::new(tap, "fuzz", [0x52, 0x54, 0, 0, 0, 1]);
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let mut d = MmioDevice::new(0xd000_0000, 5, Box::new(net), irq);
    let m = Some(&mem.mem);
    let w = |d: &mut MmioDevice, off: u64, v: u32| {
        d.write(off, &v.to_le_bytes(), m);
    };
    let r = |d: &mut MmioDevice, off: u64| {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut d, 8), 1, "a network card");
    w(&mut d, 0x70, 1);
    w(&mut d, 0x70, 3);
    for sel in 0..2u32 {
        w(&mut d, 0x14, sel);
        let f = if flags & 2 != 0 {
            u32::MAX
        } else {
            r(&mut d, 0x10)
        };
        w(&mut d, 0x24, sel);
        w(&mut d, 0x20, f);
    }
    w(&mut d, 0x70, 0xb);
    let qi = (flags & 1) as u32;
    w(&mut d, 0x30, qi);
    w(&mut d, 0x38, size as u32);
    for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        w(&mut d, off, a as u32);
        w(&mut d, off + 4, (a >> 32) as u32);
    }
    w(&mut d, 0x44, 1);
    w(&mut d, 0x70, 0xf);
    // The MAC is in the configuration space.
    let mut mac = [0u8; 6];
    d.read(0x100, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 0, 0, 1]);
    for _ in 0..2 {
        if d.write(0x50, &qi.to_le_bytes(), m) {
            d.process(&mem.mem);
        }
    }
    let st = d.status();
    const NEEDS_RESET: u32 = 0x40;
    let bad_size = size == 0 || !size.is_power_of_two() || size > 256;
    if bad_size {
        assert!(st & NEEDS_RESET != 0, "bad queue size {size} accepted");
    }
    if st & NEEDS_RESET != 0 {
        assert!(d.last_error.is_some());
    }
    let c = d.counters;
    if flags & 2 != 0 {
        assert_eq!(st & 0x8, 0, "features the device does not offer accepted");
        assert_eq!(c.requests, 0);
    }
    // A frame reaches the guest at most once. (`drops` is no bound here:
    // it also counts frames the guest sent while the TAP's queue was full.)
    assert!(c.rx_frames <= frames as u64, "{c:?}");
    let mut sent = Vec::new();
    let mut buf = vec![0u8; 70000];
    while let Ok(n) = wire.recv(&mut buf) {
        sent.push(buf[..n].to_vec());
    }
    assert_eq!(sent.len() as u64, c.tx_frames, "{c:?}");
    assert!(sent.iter().all(|f| f.len() <= 65535));
    let mut len0 = [0u8; 4];
    let mut at = vec![0u8; 80];
    let _ = mem.read(used.wrapping_add(8), &mut len0);
    let _ = mem.read(0x1400, &mut at);
    let outcome = VnOutcome {
        first_used: (u32::from_le_bytes(len0), at),
        status: st,
        counters: c,
        sent,
        reset_reason: (st & NEEDS_RESET != 0)
            .then(|| d.last_error.as_ref().map(|e| e.to_string()))
            .flatten(),
    };
    w(&mut d, 0x70, 0);
    assert_eq!(r(&mut d, 0x70), 0);
    assert_eq!(r(&mut d, 0x44), 0);
    Some(outcome)
}

fn virtio_net_seeds(out: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    // Guest memory image (first range at 0x1000): descriptor table at
    // 0x1000, avail ring at 0x1100, used ring at 0x1200, buffers from 0x1400.
    let desc = |img: &mut [u8], i: usize, addr: u64, len: u32, fl: u16, next: u16| {
        let o = i * 16;
        img[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        img[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
        img[o + 12..o + 14].copy_from_slice(&fl.to_le_bytes());
        img[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
    };
    // `tx`: a transmit chain (12-byte header, then a 60-byte frame of
    // 0xab); otherwise one 2 KiB receive buffer. `frames` wait on the TAP.
    let input = |size: u16, tx: bool, frames: u8, f: &dyn Fn(&mut [u8])| {
        let mut img = vec![0u8; 0x1000];
        if tx {
            desc(&mut img, 0, 0x1400, 12, 1, 1);
            desc(&mut img, 1, 0x1500, 60, 0, 0);
            img[0x500..0x500 + 60].fill(0xab);
        } else {
            desc(&mut img, 0, 0x1400, 2048, 2, 0);
        }
        img[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx
        f(&mut img);
        let mut v = Vec::new();
        v.extend_from_slice(&size.to_le_bytes());
        v.push(tx as u8);
        v.push(frames);
        for a in [0u64, 0x100, 0x200] {
            v.extend_from_slice(&a.to_le_bytes());
        }
        v.extend_from_slice(&img);
        v
    };
    let vn = "virtio_net";
    out.push((vn, "rx-ok", input(16, false, 1, &|_| {})));
    out.push((vn, "rx-no-frame", input(16, false, 0, &|_| {})));
    out.push((vn, "rx-two-frames-one-buffer", input(16, false, 2, &|_| {})));
    out.push((
        vn,
        "rx-small-buffer",
        input(16, false, 1, &|i| desc(i, 0, 0x1400, 64, 2, 0)),
    ));
    out.push((
        vn,
        "rx-read-only-buffer",
        input(16, false, 1, &|i| desc(i, 0, 0x1400, 2048, 0, 0)),
    ));
    out.push((
        vn,
        "rx-outside-memory",
        input(16, false, 1, &|i| desc(i, 0, 0x8000, 2048, 2, 0)),
    ));
    out.push((vn, "tx-ok", input(16, true, 0, &|_| {})));
    out.push((
        vn,
        "tx-header-only",
        input(16, true, 0, &|i| desc(i, 0, 0x1400, 12, 0, 0)),
    ));
    out.push((
        vn,
        "tx-loop",
        input(16, true, 0, &|i| desc(i, 1, 0x1500, 60, 1, 0)),
    ));
    out.push((
        vn,
        "tx-oversized",
        input(16, true, 0, &|i| desc(i, 1, 0x1500, 1 << 20, 0, 0)),
    ));
    out.push((
        vn,
        "tx-outside-memory",
        input(16, true, 0, &|i| desc(i, 1, 0x8000, 60, 0, 0)),
    ));
    out.push((vn, "bad-size", input(512, false, 1, &|_| {})));
    out.push((
        vn,
        "avail-idx-jump",
        input(16, true, 0, &|i| {
            i[0x102..0x104].copy_from_slice(&200u16.to_le_bytes())
        }),
    ));
    out.push((vn, "all-features", {
        let mut v = input(16, false, 1, &|_| {});
        v[2] |= 2;
        v
    }));
}
