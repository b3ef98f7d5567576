//! Where a program hooks into an interface. XDP in driver mode is the fastest
//! hook on a physical NIC, but on a veth it strips GSO from the peer (every
//! frame then travels alone) and without fragment support it is refused above
//! a page-sized MTU. tc (clsact) sees whole GSO packets, so virtual interfaces
//! get tc. Generic (skb) XDP, which copies every non-linear packet, is never used.

use std::path::Path;

use aya::programs::tc::{SchedClassifierLinkId, TcAttachType};
use aya::programs::SchedClassifier;
use aya::Ebpf;

use super::EbpfError;

/// What the operator asked for (`s2cs --ebpf_attach`, TOML `ebpf_attach`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachPolicy {
    /// XDP in driver mode on physical NICs, tc on virtual interfaces and
    /// wherever driver mode is refused.
    #[default]
    Auto,
    /// XDP in driver mode everywhere (an interface that refuses it gets tc,
    /// with a warning).
    Xdp,
    /// tc (clsact) everywhere.
    Tc,
}

/// Where a program ended up on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    XdpDriver,
    Tc,
}

impl Hook {
    /// Stable name for logs, metrics and `s2uc status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::XdpDriver => "xdp",
            Hook::Tc => "tc",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hook `policy` asks for on `iface`.
pub fn preferred_hook(iface: &str, policy: AttachPolicy) -> Hook {
    match policy {
        AttachPolicy::Xdp => Hook::XdpDriver,
        AttachPolicy::Tc => Hook::Tc,
        AttachPolicy::Auto if is_virtual(iface) => Hook::Tc,
        AttachPolicy::Auto => Hook::XdpDriver,
    }
}

/// True for software interfaces (veth, bridge, vxlan, tun, bond, loopback...):
/// the kernel gives only hardware-backed ones a `device` link in sysfs.
pub fn is_virtual(iface: &str) -> bool {
    is_virtual_in(Path::new("/sys/class/net"), iface)
}

fn is_virtual_in(sysfs_net: &Path, iface: &str) -> bool {
    !sysfs_net.join(iface).join("device").exists()
}

/// Attaches the loaded classifier `program` of `ebpf` to `iface` at `point`.
/// Kernels from 6.6 on attach through tcx links and need no qdisc; older ones
/// need a clsact qdisc, added here when missing.
pub fn attach_tc(
    ebpf: &mut Ebpf,
    object: &'static str,
    program: &'static str,
    iface: &str,
    point: TcAttachType,
) -> Result<SchedClassifierLinkId, EbpfError> {
    let tc_error = |source: aya::programs::ProgramError| EbpfError::AttachTc {
        program,
        iface: iface.to_owned(),
        source,
    };
    use aya::util::KernelVersion;
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // An existing clsact (ours from an earlier start, or another tool's) is fine.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
    }
    classifier_mut(ebpf, object, program)?
        .attach(iface, point)
        .map_err(tc_error)
}

/// The loaded classifier `name` of `ebpf`.
pub(super) fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    let missing = EbpfError::Missing {
        object,
        kind: "program",
        name,
    };
    let program = ebpf.program_mut(name).ok_or(missing)?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_without_a_device_link_are_virtual() {
        let dir = std::env::temp_dir().join(format!("ss-attach-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("eth0/device")).unwrap();
        std::fs::create_dir_all(dir.join("veth0")).unwrap();
        assert!(!is_virtual_in(&dir, "eth0"));
        assert!(is_virtual_in(&dir, "veth0"));
        assert!(
            is_virtual_in(&dir, "absent"),
            "an unknown interface is not taken for a NIC"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn auto_picks_tc_on_virtual_and_the_forced_policies_win() {
        assert_eq!(preferred_hook("lo", AttachPolicy::Auto), Hook::Tc);
        assert_eq!(preferred_hook("lo", AttachPolicy::Xdp), Hook::XdpDriver);
        assert_eq!(preferred_hook("lo", AttachPolicy::Tc), Hook::Tc);
        assert_eq!(Hook::XdpDriver.to_string(), "xdp");
    }
}
