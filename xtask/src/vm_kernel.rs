//! The kernels `vm-test` boots, from Debian's archive: bookworm's 6.1 cloud
//! kernel (through the machine's own apt lists) and sid's current one
//! (through private lists under the cache, so the system's apt state is never
//! touched). Packages and their unpacked trees stay in the cache between runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use crate::setup::run;

#[derive(Clone, Copy)]
pub enum Suite {
    Bookworm,
    Sid,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Bookworm => "bookworm",
            Suite::Sid => "sid",
        }
    }

    /// Whether the kernel takes new TLS 1.3 keys on a live socket (Linux
    /// 6.14+): bookworm's 6.1 does not, sid's current kernel does.
    pub fn can_rekey(self) -> bool {
        matches!(self, Suite::Sid)
    }
}

pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-48-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Uncompressed modules to insmod, in order.
    pub modules: Vec<PathBuf>,
}

/// Modules to load, in dependency order (there is no modprobe in the VM).
/// Kernel TLS asks the crypto API for "gcm(aes)", which the cloud kernels
/// build as modules (gcm, ctr, ghash, gf128mul; AES-NI for speed); without
/// them setting TLS_TX fails with ENOENT. `veth` joins the test's network
/// namespaces. Names missing from a kernel's modules are built in there (or
/// absent) and skipped; `tls` is required.
const MODULES: &[&str] = &[
    "gf128mul",
    "ghash-generic",
    "ctr",
    "gcm",
    "libaes",
    "cryptd",
    "crypto_simd",
    "aesni-intel",
    "tls",
    "veth",
];

/// Sid's lists are refreshed when older than this.
const LIST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub fn fetch(suite: Suite, cache: &Path) -> Result<Kernel> {
    let apt = Apt::for_suite(suite, cache)?;
    let release = apt.cloud_kernel_release()?;
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let packages: Vec<String> = match suite {
        Suite::Bookworm => vec![format!("linux-image-{release}-unsigned")],
        // Since 6.1x Debian splits the image into a kernel and a modules package.
        Suite::Sid => vec![
            format!("linux-binary-{release}"),
            format!("linux-modules-{release}"),
        ],
    };
    let tree = cache.join(format!("kernel-{release}"));
    let stamp = tree.join(".unpacked");
    if !stamp.is_file() {
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&tree)?;
        for p in &packages {
            let deb = apt.download(p, &debs)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
                .with_context(|| format!("unpacking {}", deb.display()))?;
        }
        std::fs::write(&stamp, b"")?;
    }
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("no modules directory for {release} in {}", tree.display()))?;
    let vmlinuz = [
        tree.join(format!("boot/vmlinuz-{release}")),
        moddir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release} in {}", tree.display()))?;
    let mut files = Vec::new();
    walk(&moddir.join("kernel"), &mut files)?;
    let mut modules = Vec::new();
    for name in MODULES {
        let wanted = [format!("{name}.ko"), format!("{name}.ko.xz")];
        let Some(found) = files.iter().find(|f| {
            f.file_name()
                .is_some_and(|n| wanted.iter().any(|w| n == w.as_str()))
        }) else {
            if *name == "tls" {
                bail!("{release} has no tls module under {}", moddir.display());
            }
            continue;
        };
        let found = found.to_string_lossy().into_owned();
        let plain = PathBuf::from(found.trim_end_matches(".xz"));
        let packed = plain.with_extension("ko.xz");
        if !plain.is_file() && packed.is_file() {
            // busybox's insmod takes plain .ko files only: unpack here.
            run(Command::new("xz").args(["-dk"]).arg(&packed))
                .with_context(|| format!("unpacking {}", packed.display()))?;
        }
        if !plain.is_file() {
            bail!("{} is not in {release}'s packages", plain.display());
        }
        modules.push(plain);
    }
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// Every file below `dir` (a kernel's module tree).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// apt-get / apt-cache with either the system's lists or private ones.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn for_suite(suite: Suite, cache: &Path) -> Result<Self> {
        match suite {
            Suite::Bookworm => Ok(Self {
                options: Vec::new(),
            }),
            Suite::Sid => {
                let dir = cache.join("apt-sid");
                let lists = dir.join("lists");
                std::fs::create_dir_all(lists.join("partial"))?;
                std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
                let source = dir.join("sources.list");
                let line = format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} sid main\n",
                    system_debian_mirror()
                );
                std::fs::write(&source, line)?;
                let apt = Self {
                    options: vec![
                        format!("Dir::Etc::SourceList={}", source.display()),
                        "Dir::Etc::SourceParts=/dev/null".into(),
                        format!("Dir::State::Lists={}", lists.display()),
                        // The package cache too: apt would otherwise rewrite the system's.
                        format!("Dir::Cache={}", dir.join("cache").display()),
                    ],
                };
                if lists_are_stale(&lists) {
                    println!(
                        "vm-test: refreshing sid's package lists (private, under {})...",
                        dir.display()
                    );
                    run(apt.command("apt-get").arg("update").arg("-qq"))
                        .context("apt-get update for sid")?;
                }
                Ok(apt)
            }
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c
    }

    /// `6.1.0-48-cloud-amd64` from the `linux-image-cloud-amd64` meta package.
    fn cloud_kernel_release(&self) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|r| r.trim().to_string())
            .find(|r| r.ends_with("-cloud-amd64"))
            .context("apt-cache depends linux-image-cloud-amd64 names no linux-image-<release>-cloud-amd64 (run apt-get update?)")
    }

    /// `apt-get download` into `dir`, unless a .deb of that package is there.
    fn download(&self, package: &str, dir: &Path) -> Result<PathBuf> {
        if let Some(deb) = find_deb(dir, package)? {
            return Ok(deb);
        }
        println!("vm-test: downloading {package}...");
        run(self
            .command("apt-get")
            .args(["download", "-qq", package])
            .current_dir(dir))
        .with_context(|| format!("apt-get download {package}"))?;
        find_deb(dir, package)?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                dir.display()
            )
        })
    }
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        // apt escapes ':' and '+' in file names as %3a / %2b.
        let unescaped = name.replace("%2b", "+").replace("%3a", ":");
        if unescaped.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(name)));
        }
    }
    Ok(None)
}

fn lists_are_stale(lists: &Path) -> bool {
    let newest = std::fs::read_dir(lists)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    match newest {
        Some(t) => SystemTime::now()
            .duration_since(t)
            .map(|age| age > LIST_MAX_AGE)
            .unwrap_or(false),
        None => true,
    }
}

/// The Debian archive this machine's apt already uses (a mirror or proxy may
/// be the only one reachable), for the private sid list.
fn system_debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sources") || name.ends_with(".list") {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    mirror_from(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// The first archive URI (not the security archive) in one-line or deb822 sources.
fn mirror_from(texts: &[String]) -> Option<String> {
    for t in texts {
        for line in t.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else {
                None
            };
            if let Some(u) = uri
                .filter(|u| !u.contains("security") && u.trim_end_matches('/').ends_with("/debian"))
            {
                return Some(u.trim_end_matches('/').to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_comes_from_deb822_or_one_line_sources_but_not_security() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            mirror_from(&[deb822.into()]).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = "deb [arch=amd64] http://ftp.example.org/debian bookworm main\n";
        assert_eq!(
            mirror_from(&[one_line.into()]).as_deref(),
            Some("http://ftp.example.org/debian")
        );
        assert_eq!(mirror_from(&["# nothing\n".into()]), None);
    }
}
