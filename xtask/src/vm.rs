//! `cargo xtask vm-test`: proves the kernel-TLS data path on real Debian
//! kernels, since the development host has no kernel TLS. For each kernel it
//! fetches the Debian package (cached), packs an initramfs holding busybox,
//! the kernel's tls.ko and a static test binary (`scistream-ctl/tests/
//! vm_ktls.rs`, built for musl), boots it under QEMU (TCG) and reads the
//! test's PASS/FAIL marker from the serial console.
//!
//! What each kernel must show, with `--ktls auto` (the default, as s2cs runs):
//! sid's current kernel re-keys TLS 1.3, so the tunnel runs in kernel TLS and
//! is forced to re-key every `--rekey-mib` MiB mid-stream; bookworm's 6.1
//! cannot re-key, so the tunnel stays in rustls. On both, a KeyUpdate flood
//! is cut off. On re-keying kernels two mixed sessions follow, one gateway
//! forced into rustls (`SCISTREAM_KTLS=off`, its own process) and the other
//! in kernel TLS, each way round, re-keying against each other (the kernel
//! side every `--rekey-mib` MiB, the rustls side twice as often) over
//! `--mixed-mib` MiB each way; then the kernel TLS vs rustls comparison.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bins, setup, vm_kernel};

/// The target of the static test binary: nothing to carry into the initramfs.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Printed by the test binary as its last line.
const MARKER: &str = "SCISTREAM-VM-TEST: ";

#[derive(clap::Args)]
pub struct Args {
    /// Which kernels to boot: bookworm (6.1, no TLS 1.3 re-keying), sid (current), or all.
    #[arg(long, value_enum, default_value = "all")]
    kernel: KernelChoice,
    /// MiB the test streams each way through the tunnel on kernels that re-key.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// MiB each way on kernels that cannot re-key (the fallback to rustls).
    #[arg(long, default_value_t = 16)]
    fallback_mib: u64,
    /// SCISTREAM_KTLS inside the VM: `auto` (as s2cs runs: kernel TLS only
    /// where the kernel re-keys), `on` (kernel TLS on every kernel; no forced
    /// re-keys where the kernel cannot), `off`.
    #[arg(long, default_value = "auto")]
    ktls: String,
    /// Forced re-key interval (SCISTREAM_REKEY_BYTES) in MiB on kernels that re-key; 0: none.
    #[arg(long, default_value_t = 8)]
    rekey_mib: u64,
    /// MiB each way for the kernel TLS vs rustls comparison on kernels that re-key; 0: none.
    #[arg(long, default_value_t = 32)]
    compare_mib: u64,
    /// MiB each way for each mixed-tier session on kernels that re-key (one
    /// gateway in rustls, the other in kernel TLS, both re-keying; both
    /// ways round); 0: none.
    #[arg(long, default_value_t = 64)]
    mixed_mib: u64,
    /// Give up on a VM after this many seconds (TCG emulation is slow).
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KernelChoice {
    Bookworm,
    Sid,
    All,
}

/// Debian packages this command runs or packs.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "cpio",
    "busybox-static",
    "musl-tools",
    "xz-utils",
    "gzip",
];

pub fn main(args: &Args) -> Result<std::process::ExitCode> {
    setup::ensure(PACKAGES)?;
    ensure_musl_target()?;
    let cache = bins::target_dir()?.join("vm-test");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let test_bin = build_test_binary()?;
    let kernels: Vec<vm_kernel::Suite> = match args.kernel {
        KernelChoice::Bookworm => vec![vm_kernel::Suite::Bookworm],
        KernelChoice::Sid => vec![vm_kernel::Suite::Sid],
        KernelChoice::All => vec![vm_kernel::Suite::Bookworm, vm_kernel::Suite::Sid],
    };
    let mut failed = Vec::new();
    for suite in kernels {
        let kernel = vm_kernel::fetch(suite, &cache)?;
        let initrd = cache.join(format!("initrd-{}.gz", kernel.release));
        build_initramfs(&kernel, &test_bin, &test_command(args, suite), &initrd)?;
        println!("vm-test: booting {} ({})", kernel.release, suite.name());
        match boot(&kernel.vmlinuz, &initrd, Duration::from_secs(args.timeout))? {
            Outcome::Pass {
                boot_secs,
                total_secs,
            } => {
                println!("vm-test: {} PASS (test started {boot_secs:.1} s after boot began, VM ran {total_secs:.1} s)", kernel.release)
            }
            Outcome::Fail(why) => {
                println!("vm-test: {} FAIL: {why}", kernel.release);
                failed.push(kernel.release.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        bail!("vm-test failed on {}", failed.join(", "))
    }
}

fn ensure_musl_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == MUSL)
    {
        return Ok(());
    }
    println!("adding the Rust target {MUSL}...");
    let status = Command::new("rustup")
        .args(["target", "add", MUSL])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("rustup target add {MUSL} failed");
    }
    Ok(())
}

/// The example, statically linked. ring compiles C and assembly, so the musl
/// target needs a C compiler for musl: Debian's `musl-gcc` wrapper.
fn build_test_binary() -> Result<PathBuf> {
    let mut cmd = bins::cargo();
    cmd.args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "scistream-ctl",
        "--test",
        "vm_ktls",
    ])
    .arg("--message-format=json-render-diagnostics")
    .env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    let built = bins::artifacts(cmd)?;
    built
        .get("vm_ktls")
        .cloned()
        .context("cargo built no vm_ktls executable")
}

/// The test's command line in the VM for this kernel (see the module doc).
fn test_command(args: &Args, suite: vm_kernel::Suite) -> String {
    let rekeys = suite.can_rekey();
    let expect = match (args.ktls.as_str(), rekeys) {
        ("on", _) | ("auto", true) => "kernel",
        ("off", _) | ("auto", false) => "rustls",
        _ => "any",
    };
    let mut env = format!("SCISTREAM_KTLS={}", args.ktls);
    if rekeys && args.rekey_mib > 0 {
        env.push_str(&format!(" SCISTREAM_REKEY_BYTES={}", args.rekey_mib << 20));
    }
    let compare = if rekeys { args.compare_mib } else { 0 };
    // The kernel half of a mixed session needs kernel TLS that re-keys.
    let mixed = if rekeys && expect == "kernel" && args.rekey_mib > 0 {
        args.mixed_mib
    } else {
        0
    };
    let size = if rekeys {
        args.size_mib
    } else {
        args.fallback_mib
    };
    format!(
        "{env} /bin/vm_ktls --netns --expect {expect} --size-mib {size} --compare-mib {compare} --mixed-mib {mixed}"
    )
}

/// A gzip'ed `newc` cpio with /init, busybox, the modules and the test.
fn build_initramfs(
    kernel: &vm_kernel::Kernel,
    test_bin: &Path,
    test: &str,
    out: &Path,
) -> Result<()> {
    let root = out.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "dev", "proc", "sys", "tmp", "modules"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox missing (Debian package busybox-static)");
    }
    std::fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
    std::fs::copy(test_bin, root.join("bin/vm_ktls")).context("copying the test binary")?;
    let mut insmods = String::new();
    for (i, m) in kernel.modules.iter().enumerate() {
        let name = format!(
            "{i:02}-{}",
            m.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("module.ko")
        );
        std::fs::copy(m, root.join("modules").join(&name))?;
        insmods.push_str(&format!(
            "$B insmod /modules/{name} || echo \"vm-test: insmod {name} failed\"\n"
        ));
    }
    // /dev/console does not exist in an empty initramfs; devtmpfs provides it,
    // and only then can init's output reach the serial console.
    let init = format!(
        "#!/bin/busybox sh\n\
         B=/bin/busybox\n\
         $B mount -t devtmpfs dev /dev\n\
         exec </dev/console >/dev/console 2>&1\n\
         $B mount -t proc proc /proc\n\
         $B mount -t sysfs sys /sys\n\
         $B mount -t tmpfs tmp /tmp\n\
         echo \"vm-test: init running on $($B uname -r) after $($B cut -d' ' -f1 /proc/uptime) s\"\n\
         {insmods}\
         $B ip link set lo up\n\
         echo \"vm-test: {test}\"\n\
         {test}\n\
         echo \"vm-test: test exited with $?\"\n\
         $B poweroff -f\n"
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755))?;
    let script = format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
        root.display(),
        out.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("packing the initramfs failed");
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

enum Outcome {
    Pass { boot_secs: f64, total_secs: f64 },
    Fail(String),
}

/// Boots the VM, echoes its console and returns the marker's verdict.
fn boot(vmlinuz: &Path, initrd: &Path, timeout: Duration) -> Result<Outcome> {
    use std::io::{BufRead, BufReader};
    // TCG: /dev/kvm exists on the hosts we know but guests hang there.
    let mut child = Command::new("qemu-system-x86_64")
        // thread=multi: one host thread per vCPU, so both host cores emulate.
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let start = Instant::now();
    let pid = child.id();
    // A watchdog: killing qemu ends the read loop below.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return true;
        }
        false
    });
    let mut verdict = None;
    let mut boot_secs = 0.0;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).trim_end().to_string();
        println!("  | {line}");
        if line.contains("vm-test: init running") {
            boot_secs = start.elapsed().as_secs_f64();
        }
        if let Some(rest) = line.split_once(MARKER).map(|(_, r)| r.to_string()) {
            verdict = Some(rest);
        }
    }
    let _ = child.wait();
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let total_secs = start.elapsed().as_secs_f64();
    Ok(match verdict {
        Some(v) if v == "PASS" => Outcome::Pass {
            boot_secs,
            total_secs,
        },
        Some(v) => Outcome::Fail(v),
        None if timed_out => Outcome::Fail(format!("no verdict within {timeout:?}")),
        None => Outcome::Fail("the VM stopped without a verdict".into()),
    })
}
