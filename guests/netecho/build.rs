fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rustc-link-arg=-T{dir}/../l2.ld");
    println!("cargo:rerun-if-changed={dir}/../l2.ld");
}
