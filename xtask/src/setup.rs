//! Machine set-up shared by `run`, `test` and `demo`: everything a fresh Debian
//! machine lacks to build and test scistream-rs, installed on demand. Each step
//! checks first and stays silent when there is nothing to do, so the common case
//! costs a few milliseconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::privilege;

/// bpf-linker version known to build with the nightly's LLVM (docs/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every step; `packages` are the Debian packages this command needs.
pub fn ensure(packages: &[&str]) -> Result<()> {
    ensure_debian_packages(packages)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

/// What `cargo xtask fuzz` needs: nightly and cargo-fuzz (built once from
/// crates.io into cargo's bin directory, about 2 minutes).
pub fn ensure_fuzzing() -> Result<()> {
    ensure_nightly_rust_src()?;
    add_cargo_bin_to_path();
    if in_path("cargo-fuzz") {
        return Ok(());
    }
    println!("installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 2 minutes, once)...");
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        // Its own temporary target dir: nothing of it belongs in the shared cache.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR"))
    .context("installing cargo-fuzz")
}

/// cargo-fuzz version `cargo xtask fuzz` was written against.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to completion; a non-zero exit is an error naming it.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

/// The nightly toolchain builds the eBPF programs with `-Z build-std=core`, which
/// needs the standard library's source.
fn ensure_nightly_rust_src() -> Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"])).context(
        "rustup is needed to install the nightly toolchain for the eBPF build (https://rustup.rs)",
    )?;
    if !toolchains
        .lines()
        .any(|l| l.starts_with("nightly-") || l.starts_with("nightly "))
    {
        println!("installing the nightly Rust toolchain with rust-src (for the eBPF programs)...");
        return run(rustup().args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        println!("adding rust-src to the nightly toolchain...");
        run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(rustup().args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin")
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
}

/// Puts cargo's bin dir on PATH for our children (the eBPF build looks up
/// `bpf-linker` there) when it is not already.
fn add_cargo_bin_to_path() {
    let dir = cargo_bin_dir();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == dir) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // Still single-threaded here, before any child process or thread exists.
        std::env::set_var("PATH", joined);
    }
}

/// bpf-linker is not shipped as a binary; it is built against the LLVM library
/// the nightly toolchain itself ships, whose major version must match the crate
/// feature (`llvm-22` for LLVM 22).
fn ensure_bpf_linker() -> Result<()> {
    add_cargo_bin_to_path();
    if in_path("bpf-linker") {
        return Ok(());
    }
    let version = output(rustup().args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm_major =
        llvm_major(&version).context("no `LLVM version:` line in `rustc +nightly -vV`")?;
    let lib_dir = nightly_sysroot()?.join("lib");
    let llvm_lib = find_llvm_dylib(&lib_dir)?;
    println!("installing bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} (about a minute)...");
    let rustflags = format!(
        "-L {dir} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    run(rustup()
        .args([
            "run",
            "nightly",
            "cargo",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--locked", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags)
        // A private temporary target dir: these RUSTFLAGS must not touch the shared cache.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR"))
    .context("installing bpf-linker")?;
    if !in_path("bpf-linker") {
        bail!(
            "bpf-linker installed but not found in {}",
            cargo_bin_dir().display()
        );
    }
    Ok(())
}

/// "22" from the `LLVM version: 22.1.4` line of `rustc -vV`.
fn llvm_major(rustc_vv: &str) -> Option<String> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?;
    let major = version.trim().split('.').next()?;
    major.parse::<u32>().ok().map(|m| m.to_string())
}

/// The `-l dylib=` name of nightly's LLVM, e.g. `LLVM-22-rust-1.97.0-nightly` for
/// `libLLVM-22-rust-1.97.0-nightly.so`.
fn find_llvm_dylib(lib_dir: &Path) -> Result<String> {
    let entries =
        std::fs::read_dir(lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so")) {
            if stem.starts_with("LLVM-") && stem.contains("-rust-") {
                return Ok(stem.to_owned());
            }
        }
    }
    bail!(
        "no libLLVM-*-rust-*.so in {} (is the nightly toolchain complete?)",
        lib_dir.display()
    )
}

fn is_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !Path::new("/usr/bin/dpkg-query").exists() {
        eprintln!(
            "note: not a Debian system; make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let mut missing = Vec::new();
    for package in packages {
        if !is_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing Debian packages: {}...", missing.join(" "));
    let apt = |args: &[&str]| -> Result<Command> {
        let mut cmd = privilege::as_root(Path::new("apt-get"), args)
            .into_command()
            .context("installing Debian packages")?;
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        Ok(cmd)
    };
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(&missing);
    if run(&mut apt(&install_args)?).is_err() {
        // Usually stale package lists (a fresh machine or container has none):
        // refresh once and retry.
        println!("apt-get install failed; running apt-get update and retrying...");
        run(&mut apt(&["update"])?)?;
        run(&mut apt(&install_args)?).context("installing Debian packages")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).as_deref(), Some("22"));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn llvm_dylib_name_drops_lib_and_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in [
            "librustc_driver-abc.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "libLLVM-22-rust-1.97.0-nightly.so",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("file");
        }
        assert_eq!(
            find_llvm_dylib(dir.path()).expect("found"),
            "LLVM-22-rust-1.97.0-nightly"
        );
    }
}
