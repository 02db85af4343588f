//! Builds the guests in `guests/` for x86_64-unknown-none so the vmbeam
//! binary can embed them: a fresh clone needs nothing but `cargo build`.
//!
//! rustup installs the targets listed in `rust-toolchain.toml` only when it
//! installs the toolchain itself; a machine that already has the pinned
//! toolchain without the guest target would fail here. So the build checks
//! the sysroot of the compiler cargo runs and, when the target is missing,
//! adds it to that toolchain (and nothing else) through rustup.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the guests are built for.
const GUEST_TARGET: &str = "x86_64-unknown-none";

/// The sysroot of the compiler cargo gave this build script, if it answers.
fn sysroot() -> Option<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_target(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib")
        .join(GUEST_TARGET)
        .join("lib")
        .is_dir()
}

/// Stops the build with one sentence on stderr (cargo shows it under the
/// build script's output).
fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// Makes sure the guest target exists for the toolchain cargo runs.
fn ensure_guest_target() {
    let Some(root) = sysroot() else {
        // Not a rustup-style toolchain we can inspect; let the guest build
        // report what is wrong.
        return;
    };
    // Cargo replays a build script's warnings while its output is cached; a
    // change of the target's directory (the install below) reruns the
    // script, which then finds the target and says nothing.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lib/rustlib").join(GUEST_TARGET).display()
    );
    if has_target(&root) {
        return;
    }
    // rustup sets RUSTUP_TOOLCHAIN for the processes it starts; without it
    // the toolchain is named after its sysroot directory.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| root.file_name().map(|n| n.to_string_lossy().into_owned()));
    let command = match &toolchain {
        Some(t) => format!("rustup target add {GUEST_TARGET} --toolchain {t}"),
        None => format!("rustup target add {GUEST_TARGET}"),
    };
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", GUEST_TARGET])
        .env("RUST_BACKTRACE", "0");
    if let Some(t) = &toolchain {
        cmd.args(["--toolchain", t]);
    }
    let outcome = cmd.output();
    match outcome {
        Ok(out) if out.status.success() && has_target(&root) => {
            println!(
                "cargo:warning=installed the {GUEST_TARGET} target the guests need ({command})"
            );
        }
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr);
            let why = why
                .lines()
                .find_map(|l| l.trim().strip_prefix("error:"))
                .unwrap_or("it gave no reason")
                .trim();
            // rustup chains causes with ": "; keep what failed and the root cause.
            let parts: Vec<&str> = why.split(": ").collect();
            let why = match parts.as_slice() {
                [first, .., last] if parts.len() > 2 => format!("{first}: … {last}"),
                _ => why.to_string(),
            };
            fail(format!(
                "the guests need the {GUEST_TARGET} target, which is missing from {} and \
                 rustup could not add it ({why}); run `{command}` and build again",
                root.display()
            ))
        }
        Err(e) => fail(format!(
            "the guests need the {GUEST_TARGET} target, which is missing from {}, and rustup \
             could not be started ({e}); run `{command}` (with rustup from https://rustup.rs) \
             and build again",
            root.display()
        )),
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../..").canonicalize().unwrap();
    let guests = root.join("guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        "l1.ld",
        "l2.ld",
        ".cargo",
        "hypervisor",
        "memtouch",
        "ticker",
        "hostile",
        "stress",
        "blkcheck",
        "netecho",
        "rt",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("crates/vmbeam-abi").display()
    );
    ensure_guest_target();
    let target_dir = out.join("guests-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .status()
        .unwrap_or_else(|e| {
            fail(format!(
                "cargo could not be started to build the guests ({e})"
            ))
        });
    if !status.success() {
        fail(format!(
            "building the guests in {} for {GUEST_TARGET} failed (see the compiler's messages above)",
            guests.display()
        ));
    }
    let bin = target_dir.join("x86_64-unknown-none/release");
    for g in [
        "hypervisor",
        "memtouch",
        "ticker",
        "hostile",
        "stress",
        "blkcheck",
        "netecho",
    ] {
        std::fs::copy(bin.join(g), out.join(format!("{g}.elf")))
            .unwrap_or_else(|e| fail(format!("guest {g} was not built ({e})")));
    }
}
