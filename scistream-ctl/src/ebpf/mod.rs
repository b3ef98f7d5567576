//! The kernel side of the data plane: loads the programs that `scistream-ebpf`
//! builds (embedded in this binary by build.rs), fills their maps and attaches
//! them. One file per program; [`Guard`] is the XDP guard in front of the
//! data port range, [`SockRedirect`] the `sockmap` backend's redirect.
//!
//! Everything here needs root (or CAP_BPF + CAP_NET_ADMIN) at run time.

pub mod attach;
mod guard;
mod nat;
mod sockmap;

pub use attach::{attach_tc, is_virtual, preferred_hook, AttachPolicy, Hook};
pub use guard::{tc_ingress_programs, Attached, Guard, PeerNet, Verdict};
pub use nat::{ensure_bpffs, Action, Nat};
pub use scistream_common::guard::{Counters, DropReason};
pub use sockmap::{socket_cookie, Pair, SockRedirect};

use aya::{
    maps::MapError,
    programs::{xdp::XdpLinkId, ProgramError, Xdp},
    Ebpf, EbpfLoader,
};

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this binary was built without its eBPF programs (AYA_BUILD_SKIP was set)")]
    NotBuilt,
    #[error("loading eBPF object {object} (needs root or CAP_BPF + CAP_NET_ADMIN)")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF object {object} has no {kind} named {name}")]
    Missing {
        object: &'static str,
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching eBPF program {program} to {iface} in XDP driver mode")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("attaching eBPF program {program} to {iface} at tc (clsact)")]
    AttachTc {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {program} is not attached to {iface}")]
    NotAttached {
        program: &'static str,
        iface: String,
    },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF device map {map}")]
    DevMap {
        map: &'static str,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("invalid data port range {lo}-{hi}: want 1 <= lo <= hi, or 0-0 to disable the guard")]
    InvalidPortRange { lo: u16, hi: u16 },
    #[error("reading a socket's cookie (SO_COOKIE)")]
    SocketCookie(#[source] std::io::Error),
    #[error("eBPF pin {}", path.display())]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count the possible CPUs ({path})")]
    Cpus {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl EbpfError {
    /// Stable, low-cardinality name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotBuilt => "ebpf_not_built",
            Self::Load { .. } => "ebpf_load",
            Self::Missing { .. } => "ebpf_missing_item",
            Self::Program { .. } => "ebpf_program",
            Self::Attach { .. } => "ebpf_attach",
            Self::AttachTc { .. } => "ebpf_attach_tc",
            Self::NotAttached { .. } => "ebpf_not_attached",
            Self::Map { .. } => "ebpf_map",
            Self::DevMap { .. } => "ebpf_devmap",
            Self::InvalidPortRange { .. } => "ebpf_invalid_port_range",
            Self::Cpus { .. } => "ebpf_cpus",
            Self::Pin { .. } => "ebpf_pin",
            Self::SocketCookie(_) => "ebpf_socket_cookie",
        }
    }
}

/// Parses an embedded object (empty when the build skipped the programs)
/// and counts the possible CPUs its per-CPU maps are sized for.
fn load_object(bytes: &[u8], object: &'static str) -> Result<(Ebpf, usize), EbpfError> {
    if bytes.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    let possible_cpus =
        aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Cpus { path, source })?;
    let ebpf = load_with(&mut EbpfLoader::new(), bytes, object)?;
    Ok((ebpf, possible_cpus))
}

/// Loads an embedded object with `loader`, then returns the heap the load
/// freed to the system (see [`return_freed_heap`]). Every object loads here.
fn load_with(
    loader: &mut EbpfLoader,
    bytes: &[u8],
    object: &'static str,
) -> Result<Ebpf, EbpfError> {
    let ebpf = loader
        .load(bytes)
        .map_err(|source| EbpfError::Load { object, source })?;
    return_freed_heap();
    Ok(ebpf)
}

/// aya's loader parses the kernel's BTF (/sys/kernel/btf/vmlinux, about
/// 5 MiB on 6.18) into some 16 MiB of heap and frees it once the object is
/// loaded, but glibc keeps freed heap mapped: a gateway with the guard idled
/// at 28 MiB RSS (17 MiB of it anonymous) against 11 MiB without. Handing
/// the free pages back brings it down to what it really uses.
fn return_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// The XDP program `name` of a loaded object.
fn xdp_program<'a>(
    ebpf: &'a Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<&'a Xdp, EbpfError> {
    let missing = EbpfError::Missing {
        object,
        kind: "program",
        name,
    };
    let program = ebpf.program(name).ok_or(missing)?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

fn xdp_program_mut<'a>(
    ebpf: &'a mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<&'a mut Xdp, EbpfError> {
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

fn xdp_error(name: &'static str) -> impl Fn(ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        program: name,
        source,
    }
}

/// Loads XDP program `name` of a parsed object into the kernel.
fn load_xdp(ebpf: &mut Ebpf, object: &'static str, name: &'static str) -> Result<(), EbpfError> {
    xdp_program_mut(ebpf, object, name)?
        .load()
        .map_err(xdp_error(name))
}

/// Attaches XDP program `name` to `iface` in driver mode (never generic
/// XDP: it linearises every packet); the link lives until detached or until
/// the object is dropped.
fn attach_xdp(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
    iface: &str,
) -> Result<XdpLinkId, EbpfError> {
    xdp_program_mut(ebpf, object, name)?
        .attach(iface, aya::programs::XdpMode::Driver)
        .map_err(|source| EbpfError::Attach {
            program: name,
            iface: iface.to_owned(),
            source,
        })
}

fn detach_xdp(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
    link: XdpLinkId,
) -> Result<(), EbpfError> {
    xdp_program_mut(ebpf, object, name)?
        .detach(link)
        .map_err(xdp_error(name))
}

/// Runs XDP program `name` `repeat` times on `frame` inside the kernel
/// (BPF_PROG_TEST_RUN), with no interface involved; maps and counters change
/// as for a received frame. `data_out` receives the frame as the program left it.
fn xdp_test_run(
    ebpf: &Ebpf,
    object: &'static str,
    name: &'static str,
    frame: &[u8],
    data_out: Option<&mut [u8]>,
    repeat: u32,
) -> Result<aya::programs::TestRunResult, EbpfError> {
    use aya::programs::{TestRun, TestRunOptions};
    let options = TestRunOptions {
        data_in: Some(frame),
        data_out,
        repeat,
        ..TestRunOptions::new()
    };
    xdp_program(ebpf, object, name)?
        .test_run(options)
        .map_err(xdp_error(name))
}

/// Takes map `name` out of `ebpf`, typed, so a loader can hold it with no borrow.
fn take_map<M>(ebpf: &mut Ebpf, object: &'static str, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let missing = EbpfError::Missing {
        object,
        kind: "map",
        name,
    };
    let map = ebpf.take_map(name).ok_or(missing)?;
    M::try_from(map).map_err(map_error(name))
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

/// A map delete whose key is already gone (a program or another sweep took
/// it) succeeded as far as the caller cares. aya reports a missing key on
/// lookup as `KeyNotFound` but on delete as the syscall's ENOENT.
pub(crate) fn deleted(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod nat_tests;
