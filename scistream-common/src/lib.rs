//! Types shared by the eBPF programs (`scistream-ebpf`) and user space (`scistream-ctl`).
//! Everything here is `#[repr(C)]` and `no_std` so both sides agree on map layouts.
#![no_std]

pub mod guard;
pub mod nat;
pub mod sockmap;
