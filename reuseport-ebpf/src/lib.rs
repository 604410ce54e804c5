//! Placeholder library target so that host tools (`cargo check` of the
//! workspace, rust-analyzer) can resolve this crate; the program is the
//! `reuseport-ebpf` binary, built for `bpfel-unknown-none` only.
#![no_std]
