//! Compiles the control protocol (pure Rust, no protoc needed) and the eBPF
//! programs of `scistream-ebpf` (nightly + bpf-linker, through aya-build),
//! which `src/ebpf` embeds from OUT_DIR.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/scistream.proto");
    let fds = protox::compile(["scistream.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    build_ebpf()?;
    Ok(())
}

const EBPF_PACKAGE: &str = "scistream-ebpf";
/// The binaries of scistream-ebpf: one eBPF object each, copied to OUT_DIR/<name>.
const EBPF_OBJECTS: &[&str] = &["xdp-guard", "sk-redirect", "xdp-nat"];
/// aya-build's own switch; honoured here too so the embedded objects exist
/// (empty) and a build without the eBPF toolchain still compiles.
const SKIP_VAR: &str = "AYA_BUILD_SKIP";

fn build_ebpf() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed={SKIP_VAR}");
    let skip = env::var(SKIP_VAR).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!(
            "cargo:warning={SKIP_VAR} is set: eBPF programs are not built, loading them will fail"
        );
        for name in EBPF_OBJECTS {
            std::fs::write(out_dir.join(name), b"")?;
        }
        return Ok(());
    }

    if let Err(missing) = check_ebpf_toolchain() {
        // One line on purpose: this is what a newcomer sees on a fresh machine.
        println!(
            "cargo::error=building the eBPF programs needs {missing}; \
             run `cargo xtask run` or `cargo xtask test` once to install it \
             (or set {SKIP_VAR}=1 to build without them)"
        );
        return Ok(());
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("no CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("..").join(EBPF_PACKAGE);
    let root = root.to_str().ok_or("non UTF-8 path to scistream-ebpf")?;
    // aya-build relays every stderr line of its nested cargo as a build
    // warning; quiet drops the progress lines, compiler messages still come.
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    Ok(())
}

/// Fails with what is missing, in words for the error message. aya-build would
/// otherwise fail deep inside a nested cargo run with pages of linker output.
fn check_ebpf_toolchain() -> Result<(), String> {
    let Some(rustup) = find_in_path("rustup") else {
        return Err("rustup (for the nightly toolchain)".into());
    };
    let sysroot = Command::new(rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .ok_or("the nightly toolchain")?;
    // -Z build-std=core compiles core from source.
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
    {
        return Err("the nightly rust-src component".into());
    }
    if find_in_path("bpf-linker").is_none() {
        // `cargo install` puts it in CARGO_HOME/bin, which is not always on the
        // PATH a build runs with; rustc finds the linker through PATH only.
        let cargo_bin = cargo_home().map(|h| h.join("bin"));
        match cargo_bin.filter(|b| b.join("bpf-linker").is_file()) {
            Some(bin) => prepend_to_path(&bin),
            None => return Err("bpf-linker".into()),
        }
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

fn prepend_to_path(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    if let Ok(joined) = env::join_paths(dirs) {
        // aya-build's nested cargo inherits this PATH.
        env::set_var("PATH", joined);
    }
}
