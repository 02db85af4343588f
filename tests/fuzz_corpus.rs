//! The fuzz harnesses of `fuzz/` on the stable toolchain, as ordinary tests:
//! every committed corpus file (seeds and regression inputs) is replayed,
//! and a bounded, deterministic mutation run (xorshift, fixed seed) tries
//! variations of them. This is not coverage-guided like `cargo fuzz run`
//! (see docs/security.md, "Fuzzing") but it needs no extra tool and runs on
//! every `cargo test`. No KVM is needed.
//!
//! `VMBEAM_WRITE_SEEDS=1 cargo test --test fuzz_corpus` (re)writes the seed
//! files from `harness::seeds()`; `VMBEAM_FUZZ_ITERS=N` changes the number
//! of mutations per target (default 4000).

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn harness_of(target: &str) -> fn(&[u8]) {
    harness::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no harness for {target}"))
}

/// Runs `input` through `target`; on a panic saves the input and fails
/// with a message that says how to reproduce it.
fn run_one(target: &str, what: &str, input: &[u8]) {
    let f = harness_of(target);
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let path = std::env::temp_dir().join(format!(
            "vmbeam-fuzz-{target}-{}-{:016x}",
            std::process::id(),
            vmbeam_abi::checksum::checksum_bytes(input)
        ));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz harness {target} failed on {what} ({} bytes, saved to {}); \
             copy it to fuzz/corpus/{target}/regress-<name> once fixed",
            input.len(),
            path.display()
        );
    }
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn seeds_are_committed() {
    let write = std::env::var_os("VMBEAM_WRITE_SEEDS").is_some();
    for (target, name, bytes) in harness::seeds() {
        let path = corpus_dir(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "seed {} differs from harness::seeds(); run with VMBEAM_WRITE_SEEDS=1",
            path.display()
        );
    }
}

#[test]
fn committed_corpus_replays_cleanly() {
    for (target, _) in harness::TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        for (name, bytes) in files {
            run_one(target, &format!("fuzz/corpus/{target}/{name}"), &bytes);
        }
    }
}

/// xorshift64*: deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that tend to sit on boundaries of the checks.
const INTERESTING: [u64; 12] = [
    0,
    1,
    8,
    4096,
    vmbeam_abi::layout::EXTENT_SIZE,
    vmbeam_abi::layout::POOL_BASE,
    vmbeam_abi::layout::GRANT_BASE,
    vmbeam_abi::layout::GRANT_SIZE,
    64 << 30,
    i64::MAX as u64,
    u64::MAX - vmbeam_abi::layout::EXTENT_SIZE + 1,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if input.len() >= 8 => {
                let i = rng.below(input.len() / 8) * 8;
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let v = if rng.below(4) == 0 {
                    v.wrapping_neg()
                } else {
                    v
                };
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 if !input.is_empty() => {
                let n = rng.below(input.len() + 1);
                input.truncate(n);
            }
            4 if !input.is_empty() && input.len() < 16 << 10 => {
                let a = rng.below(input.len());
                let b = a + rng.below(input.len() - a);
                let chunk = input[a..b].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let a = rng.below(other.len());
                let n = rng.below(other.len() - a + 1);
                let at = rng.below(input.len() + 1).min(input.len());
                let end = (at + n).min(input.len());
                input.splice(at..end, other[a..a + n].iter().copied());
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

#[test]
fn mutated_corpus_keeps_every_invariant() {
    let iters: usize = std::env::var("VMBEAM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for (n, (target, _)) in harness::TARGETS.iter().enumerate() {
        let files = corpus(target);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (n as u64 + 1));
        for i in 0..iters {
            let (name, base) = &files[rng.below(files.len())];
            let other = &files[rng.below(files.len())].1;
            let mut input = base.clone();
            mutate(&mut rng, &mut input, other);
            run_one(target, &format!("mutation {i} of {name}"), &input);
        }
    }
}

/// The bad-driver seeds of `virtio_queue` end the way docs/devices.md
/// says: an error status for the one request, or DEVICE_NEEDS_RESET with
/// the reason; good requests are served.
#[test]
fn virtio_queue_seeds_end_as_documented() {
    let seeds = harness::seeds();
    let run = |name: &str| {
        let (_, _, bytes) = seeds
            .iter()
            .find(|(t, n, _)| *t == "virtio_queue" && *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"));
        harness::virtio_queue_run(bytes).unwrap()
    };
    for ok in ["read-ok", "write-ok", "get-id", "flush"] {
        let o = run(ok);
        assert_eq!(
            (o.requests, o.errors, &o.reset_reason),
            (1, 0, &None),
            "{ok}: {o:?}"
        );
    }
    for err in ["write-read-only", "past-disk-end"] {
        let o = run(err);
        assert_eq!(
            (o.requests, o.errors, &o.reset_reason),
            (1, 1, &None),
            "{err}: {o:?}"
        );
    }
    for (seed, why) in [
        ("loop", "does not end"),
        ("next-past-table", "does not end"),
        ("outside-memory", "outside guest memory"),
        ("oversized", "too long"),
        ("bad-size", "not a power of two"),
        ("too-big-size", "not a power of two"),
        ("avail-idx-jump", "avail ring index"),
    ] {
        let o = run(seed);
        assert_eq!(o.requests, 0, "{seed}: {o:?}");
        let r = o.reset_reason.unwrap_or_default();
        assert!(
            r.contains(why),
            "{seed}: reset reason {r:?}, expected {why:?}"
        );
    }
    let o = run("all-features");
    assert!(o.status & 0x80 != 0 && o.requests == 0, "{o:?}");
}

/// The bad-driver seeds of `virtio_net` end the way docs/devices.md says:
/// a frame delivered once behind a zeroed header, a frame dropped into a
/// buffer too small or read-only, or DEVICE_NEEDS_RESET with the reason;
/// a transmitted frame comes out on the TAP without its header.
#[test]
fn virtio_net_seeds_end_as_documented() {
    let seeds = harness::seeds();
    let run = |name: &str| {
        let (_, _, bytes) = seeds
            .iter()
            .find(|(t, n, _)| *t == "virtio_net" && *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"));
        harness::virtio_net_run(bytes).unwrap()
    };
    let o = run("rx-ok");
    let c = o.counters;
    assert_eq!((c.rx_frames, c.drops, c.errors), (1, 0, 0), "{o:?}");
    assert_eq!(o.first_used.0, 12 + 60, "{o:?}");
    let mut want = vec![0u8; 12];
    want[10] = 1; // num_buffers
    want.extend((0..60).map(|k| k as u8));
    assert_eq!(&o.first_used.1[..72], &want[..], "{o:?}");
    let o = run("rx-no-frame");
    assert_eq!((o.counters.rx_frames, o.counters.requests), (0, 0), "{o:?}");
    // Two frames, one buffer: one delivered, the other still waits.
    let o = run("rx-two-frames-one-buffer");
    assert_eq!((o.counters.rx_frames, o.counters.drops), (1, 0), "{o:?}");
    for seed in ["rx-small-buffer", "rx-read-only-buffer"] {
        let c = run(seed).counters;
        assert_eq!((c.rx_frames, c.drops, c.errors), (0, 1, 1), "{seed}: {c:?}");
    }
    let o = run("tx-ok");
    assert_eq!(o.sent, vec![vec![0xab; 60]], "{o:?}");
    assert_eq!((o.counters.tx_frames, o.counters.bytes_out), (1, 60));
    let o = run("tx-header-only");
    assert!(o.sent.is_empty() && o.counters.errors == 1, "{o:?}");
    for (seed, why) in [
        ("rx-outside-memory", "outside guest memory"),
        ("tx-outside-memory", "outside guest memory"),
        ("tx-loop", "does not end"),
        ("tx-oversized", "too long"),
        ("bad-size", "not a power of two"),
        ("avail-idx-jump", "avail ring index"),
    ] {
        let o = run(seed);
        assert_eq!(o.counters.requests, 0, "{seed}: {o:?}");
        assert!(o.sent.is_empty(), "{seed}: {o:?}");
        let r = o.reset_reason.unwrap_or_default();
        assert!(
            r.contains(why),
            "{seed}: reset reason {r:?}, expected {why:?}"
        );
    }
    let o = run("all-features");
    assert!(o.status & 0x80 != 0 && o.counters.requests == 0, "{o:?}");
}
