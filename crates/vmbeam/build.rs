//! Builds the guests in `guests/` for x86_64-unknown-none so the vmbeam
//! binary can embed them: a fresh clone needs nothing but `cargo build`.

use std::path::PathBuf;
use std::process::Command;

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
        "rt",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("crates/vmbeam-abi").display()
    );
    let target_dir = out.join("guests-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
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
        .expect("run cargo to build the guests");
    if !status.success() {
        panic!(
            "building the guests in {} failed; is the x86_64-unknown-none target installed? \
             (rust-toolchain.toml lists it; `rustup target add x86_64-unknown-none`)",
            guests.display()
        );
    }
    let bin = target_dir.join("x86_64-unknown-none/release");
    for g in ["hypervisor", "memtouch", "ticker", "hostile", "stress"] {
        std::fs::copy(bin.join(g), out.join(format!("{g}.elf")))
            .unwrap_or_else(|e| panic!("guest {g} was not built: {e}"));
    }
}
