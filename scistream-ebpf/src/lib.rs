//! Kernel programs of scistream-rs, written with aya-ebpf. Each program is a
//! binary under `src/bin/` and becomes its own eBPF object; this library is
//! empty on purpose (see Cargo.toml).
#![no_std]
