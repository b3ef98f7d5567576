//! The interface settings the kernel needs to take frames the NAT hands it:
//! accept_local on (set here, saved in the state directory and restored at
//! exit, also after a killed run) and rp_filter not strict (warned about).

use std::collections::HashMap;
use std::path::Path;

use tracing::{info, warn};

/// A translated frame the program hands to the kernel carries this host's
/// own address as its source, which the kernel drops as a martian unless the
/// interface has accept_local (strict rp_filter drops it too). Sets
/// accept_local=1 where it is off and returns what to restore at exit, also
/// saved in `saved`: values a killed run set are restored to what they were
/// before it, not to its 1.
pub(super) fn allow_local_sources(ifaces: &[String], saved: &Path) -> Vec<(String, String)> {
    let earlier: HashMap<String, String> = std::fs::read_to_string(saved)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(p, v)| (p.to_owned(), v.to_owned())))
        .collect();
    let mut changed = Vec::new();
    for iface in ifaces {
        let conf = format!("/proc/sys/net/ipv4/conf/{iface}");
        let read = |knob: &str| {
            std::fs::read_to_string(format!("{conf}/{knob}")).map(|v| v.trim().to_owned())
        };
        let all_rp = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
            .map(|v| v.trim().to_owned());
        // The kernel applies the larger of `all` and the interface's value.
        if read("rp_filter").is_ok_and(|v| v == "1") || all_rp.is_ok_and(|v| v == "1") {
            warn!(iface, "rp_filter is strict (1): frames the XDP program hands to the kernel are dropped there; loose (2) works");
        }
        let path = format!("{conf}/accept_local");
        if let Some(old) = earlier.get(&path) {
            changed.push((path, old.clone()));
            continue;
        }
        match read("accept_local") {
            Ok(old) if old == "0" => match std::fs::write(&path, "1") {
                Ok(()) => changed.push((path, old)),
                Err(e) => {
                    warn!(iface, error = %e, "cannot set accept_local=1: frames without a neighbour entry yet will be dropped")
                }
            },
            Ok(_) => {}
            Err(e) => warn!(iface, error = %e, "cannot read accept_local"),
        }
    }
    let record: String = changed.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
    if let Err(e) = std::fs::write(saved, record) {
        warn!(file = %saved.display(), error = %e, "cannot save the accept_local values to restore");
    }
    if !changed.is_empty() {
        info!(set = ?changed.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), "accept_local=1 for frames the XDP program hands to the kernel (restored at exit)");
    }
    changed
}
