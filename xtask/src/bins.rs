//! Building scistream-ctl and finding what cargo built, from cargo's own artifact
//! messages (so CARGO_TARGET_DIR, profiles and target triples need no guessing).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo that runs us (`cargo xtask` is `cargo run`, which sets $CARGO), in the
/// workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build -p scistream-ctl --bins`; returns the directory holding s2cs and s2uc.
pub fn build(release: bool) -> Result<PathBuf> {
    let built = build_bins(release, &["scistream-ctl"])?;
    bin_dir(&built)
}

/// The directory of s2cs and s2uc among built executables.
pub fn bin_dir(built: &HashMap<String, PathBuf>) -> Result<PathBuf> {
    let s2cs = built
        .get("s2cs")
        .context("cargo built no s2cs executable")?;
    let dir = s2cs
        .parent()
        .context("s2cs has no parent directory")?
        .to_path_buf();
    for bin in ["s2cs", "s2uc"] {
        if !dir.join(bin).is_file() {
            bail!("{} missing after the build", dir.join(bin).display());
        }
    }
    Ok(dir)
}

/// `cargo build --bins -p <each package>`; returns every executable built, by name.
pub fn build_bins(release: bool, packages: &[&str]) -> Result<HashMap<String, PathBuf>> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--bins",
        "--message-format=json-render-diagnostics",
    ]);
    for package in packages {
        cmd.args(["-p", package]);
    }
    if release {
        cmd.arg("--release");
    }
    let built = artifacts(cmd)?;
    Ok(built)
}

/// Runs a `cargo build --message-format=json...` command; returns every
/// executable it built, by target name.
pub fn artifacts(mut cmd: Command) -> Result<HashMap<String, PathBuf>> {
    let shown = format!("{cmd:?}");
    // Diagnostics and progress go to our stderr as usual; stdout carries the JSON.
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut built = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            built.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("{shown} failed");
    }
    Ok(built)
}

/// Cargo's target directory (honours CARGO_TARGET_DIR and config), from `cargo metadata`.
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

/// The host target triple, from `rustc -vV`.
pub fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("no `host:` line in rustc -vV")
}
