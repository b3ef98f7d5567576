//! Kernel programs of scistream-rs, written with aya-ebpf. Each program is a
//! binary under `src/bin/` and becomes its own eBPF object. The library holds
//! what several entry points share: a packet view for XDP and tc alike
//! ([`frame`]) and the header walk to the transport ports ([`headers`]).
#![no_std]

pub mod frame;
pub mod headers;
