//! Where the NAT runs: attaching it to interfaces (XDP in driver mode or
//! tc), the pinned links that keep it there across restarts, and taking it
//! all down again.
use std::path::{Path, PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachType},
    xdp::XdpLink,
};
use scistream_common::nat::{self as layout};

use crate::ebpf::attach::{self, classifier_mut, AttachPolicy, Hook};
use crate::ebpf::EbpfError;

use super::*;

impl Nat {
    /// Attaches to `iface` where `policy` says: with `Auto`, tc on virtual
    /// interfaces and XDP in driver mode on the others; XDP refused (no
    /// native support, or a limit such as the MTU) falls back to tc with a
    /// warning naming the interface and the reason. Generic XDP never.
    pub fn attach_with(&mut self, iface: &str, policy: AttachPolicy) -> Result<Hook, EbpfError> {
        let hook = attach::preferred_hook(iface, policy);
        match (hook, self.attach_hook(iface, hook)) {
            (_, Ok(())) => Ok(hook),
            (Hook::XdpDriver, Err(refused)) => {
                tracing::warn!(iface, reason = %crate::error_chain(&refused), "XDP in driver mode refused; the NAT uses tc on this interface");
                self.attach_hook(iface, Hook::Tc)?;
                Ok(Hook::Tc)
            }
            (Hook::Tc, Err(e)) => Err(e),
        }
    }

    /// Where the program is attached: interface and hook.
    pub fn hooks(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attached.iter().map(|(i, h, _)| (i.as_str(), *h))
    }

    /// Attaches to `iface` at `hook`; an XDP-hooked interface also takes
    /// the XDP program's redirects (tc ones are reached by the tc program's
    /// `bpf_redirect`, or through the stack).
    pub fn attach_hook(&mut self, iface: &str, hook: Hook) -> Result<(), EbpfError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| EbpfError::Attach {
            program: layout::PROGRAM,
            iface: iface.to_owned(),
            source: aya::programs::ProgramError::IOError(e.into()),
        })?;
        let attachment = match (&self.pin_dir, hook) {
            (None, Hook::XdpDriver) => Attachment::Owned(crate::ebpf::attach_xdp(
                &mut self.ebpf,
                OBJECT,
                layout::PROGRAM,
                iface,
            )?),
            (None, Hook::Tc) => Attachment::OwnedTc(attach::attach_tc(
                &mut self.ebpf,
                OBJECT,
                layout::TC_PROGRAM,
                iface,
                TcAttachType::Ingress,
            )?),
            (Some(dir), _) => {
                let pin = dir.join(format!("link-{iface}"));
                self.attach_pinned(iface, hook, pin)?
            }
        };
        self.attached.push((iface.to_owned(), hook, attachment));
        if hook == Hook::Tc {
            // An adopted devmap may still name it from an XDP run.
            let _ = self.tx_ports.remove(ifindex);
            return Ok(());
        }
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| EbpfError::DevMap {
                map: layout::TX_PORTS_MAP,
                source,
            })
    }

    /// Takes over the link pinned at `pin` (this program replaces the one
    /// in it, atomically: frames never meet an interface without one), or
    /// attaches afresh and pins the new link there. A pinned link of the
    /// other hook is removed first.
    fn attach_pinned(
        &mut self,
        iface: &str,
        hook: Hook,
        pin: PathBuf,
    ) -> Result<Attachment, EbpfError> {
        let io = |pin: &Path, e: &dyn std::fmt::Display| {
            pin_error(pin, std::io::Error::other(e.to_string()))
        };
        if pin.exists() {
            match self.take_pinned(hook, &pin) {
                Ok(link) => return Ok(Attachment::Pinned { link, pin }),
                // A link whose interface went away, or of the other hook: a
                // fresh one replaces it.
                Err(e) => {
                    tracing::warn!(iface, %hook, pin = %pin.display(), error = %crate::error_chain(&e), "pinned NAT link not reusable; attaching afresh");
                    std::fs::remove_file(&pin).map_err(|e| pin_error(&pin, e))?;
                }
            }
        }
        let link: FdLink = match hook {
            Hook::XdpDriver => {
                let id = crate::ebpf::attach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, iface)?;
                let program =
                    crate::ebpf::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
                let link = program
                    .take_link(id)
                    .map_err(crate::ebpf::xdp_error(layout::PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&pin, &e))?
            }
            Hook::Tc => {
                let id = attach::attach_tc(
                    &mut self.ebpf,
                    OBJECT,
                    layout::TC_PROGRAM,
                    iface,
                    TcAttachType::Ingress,
                )?;
                let program = classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?;
                let link = program
                    .take_link(id)
                    .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?;
                // A tcx link (kernel 6.6+); a netlink filter cannot be pinned.
                FdLink::try_from(link).map_err(|e| io(&pin, &e))?
            }
        };
        let pinned = link.pin(&pin).map_err(|e| io(&pin, &e))?;
        Ok(Attachment::Pinned {
            link: pinned.into(),
            pin,
        })
    }

    /// The pinned link at `pin` with this object's program of `hook` swapped in.
    fn take_pinned(&mut self, hook: Hook, pin: &Path) -> Result<FdLink, EbpfError> {
        let io = |e: &dyn std::fmt::Display| pin_error(pin, std::io::Error::other(e.to_string()));
        let fd = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| io(&e))?);
        match hook {
            Hook::XdpDriver => {
                let link = XdpLink::try_from(fd).map_err(|e| io(&e))?;
                let program =
                    crate::ebpf::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(crate::ebpf::xdp_error(layout::PROGRAM))?;
                let link = program
                    .take_link(id)
                    .map_err(crate::ebpf::xdp_error(layout::PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&e))
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| io(&e))?;
                let program = classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?;
                let link = program
                    .take_link(id)
                    .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&e))
            }
        }
    }

    /// Detaches from every interface (pinned links are unpinned first).
    pub fn detach_all(&mut self) -> Result<(), EbpfError> {
        for (iface, _, attachment) in std::mem::take(&mut self.attached) {
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) {
                let _ = self.tx_ports.remove(ifindex);
            }
            match attachment {
                Attachment::Owned(link) => {
                    crate::ebpf::detach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, link)?
                }
                Attachment::OwnedTc(link) => {
                    classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?
                        .detach(link)
                        .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?
                }
                Attachment::Pinned { link, pin } => {
                    std::fs::remove_file(&pin).map_err(|e| pin_error(&pin, e))?;
                    drop(link);
                }
            }
        }
        Ok(())
    }

    /// Links pinned in this object's directory for interfaces it did not
    /// attach to (an earlier run's interface list): unpinned, so detached.
    pub fn unpin_other_links(&self) -> Result<Vec<String>, EbpfError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| pin_error(dir, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link-") {
                if !self.attached.iter().any(|(i, _, _)| i == iface) {
                    std::fs::remove_file(entry.path()).map_err(|e| pin_error(&entry.path(), e))?;
                    removed.push(iface.to_owned());
                }
            }
        }
        Ok(removed)
    }

    /// Detaches everything and removes the pins (maps and links) and their
    /// directory: nothing of this NAT is left once the object drops.
    pub fn unpin(&mut self) -> Result<(), EbpfError> {
        self.detach_all()?;
        if let Some(dir) = self.pin_dir.take() {
            Self::remove_pins(&dir)?;
        }
        Ok(())
    }

    /// The bpffs directory of the pins, when pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}
