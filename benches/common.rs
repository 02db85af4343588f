//! Helpers shared by the benchmarks: the machine line, sizes from the
//! environment, medians, writing a generated section of
//! `docs/benchmarks.md`, and (from the tests) the KVM check and the
//! `/proc/self` evidence of a move.
#![allow(dead_code)]

use vmbeam_vmm::config::parse_size;

#[path = "../tests/common/kvm.rs"]
mod kvm;
pub use kvm::kvm_or_skip;
#[path = "../tests/common/moves.rs"]
pub mod moves;
#[path = "../tests/common/netns.rs"]
pub mod netns;
#[path = "../tests/common/procfs.rs"]
pub mod procfs;

/// Sizes from `VMBEAM_BENCH_SIZES` (e.g. `256M,1G`) or `default`, and
/// repetitions from `VMBEAM_BENCH_REPS` or `reps`.
pub fn sizes_and_reps(default: &str, reps: usize) -> (Vec<u64>, usize) {
    let sizes = std::env::var("VMBEAM_BENCH_SIZES")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| parse_size(s).expect("VMBEAM_BENCH_SIZES: a size like 256M"))
        .collect();
    let reps = std::env::var("VMBEAM_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(reps);
    (sizes, reps)
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Host memory in bytes.
pub fn host_mem() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// One line describing this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {} GiB RAM, Linux {}; KVM here runs guest code through its instruction emulator (about 1000x slower than hardware KVM)",
        host_mem() >> 30,
        kernel.trim()
    )
}

/// Replaces the text between `<!-- {tag}:begin -->` and `<!-- {tag}:end -->`
/// in `docs/benchmarks.md` (appending the section under `heading` if absent).
pub fn write_section(tag: &str, heading: &str, text: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md");
    let begin = format!("<!-- {tag}:begin -->");
    let end = format!("<!-- {tag}:end -->");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (doc.find(&begin), doc.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{begin}\n{text}{}", &doc[..a], &doc[b..]),
        _ => format!("{doc}\n## {heading}\n\n{begin}\n{text}{end}\n"),
    };
    std::fs::write(&path, new).expect("write docs/benchmarks.md");
    eprintln!("bench: table written to {}", path.display());
}
