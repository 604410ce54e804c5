//! What the running kernel offers the steering program, found by asking
//! the kernel (a map created, a tiny program loaded) rather than by reading
//! its version: distribution kernels backport BPF features, and a version
//! number says nothing about what a given build enables.
//!
//! Two probes come from aya (`is_program_supported`, `is_map_supported`).
//! The others need a map flag or an instruction aya's probes cannot
//! express, so they make the `bpf(2)` call themselves with a zeroed
//! `union bpf_attr` holding only the fields they set (`include/uapi/linux/bpf.h`).

use std::sync::OnceLock;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

use crate::error::{Error, Result};

/// One kernel feature the program uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `BPF_PROG_TYPE_SK_REUSEPORT`: the program type itself.
    SkReuseportProgram,
    /// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`: the socket map it selects from.
    ReuseportSockarray,
    /// BPF atomic fetch-and-add (`BPF_ATOMIC | BPF_FETCH`): round-robin
    /// tickets and the weighted turn counter.
    Atomics,
    /// `BPF_F_MMAPABLE` arrays: workers update their records without a syscall.
    MmapableArrays,
    /// `BPF_MAP_TYPE_RINGBUF`: the program's log records (aya-log).
    RingBuffer,
    /// Listener migration (`BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` and the
    /// context's `migrating_sk`): the program places the queued connections
    /// of a closing listener. Optional.
    Migration,
}

impl Feature {
    /// Every feature, in the order of the README's table.
    pub const ALL: [Feature; 6] = [
        Feature::SkReuseportProgram,
        Feature::ReuseportSockarray,
        Feature::MmapableArrays,
        Feature::RingBuffer,
        Feature::Atomics,
        Feature::Migration,
    ];

    /// What the feature is, as errors and the log name it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::SkReuseportProgram => "BPF_PROG_TYPE_SK_REUSEPORT programs",
            Feature::ReuseportSockarray => "BPF_MAP_TYPE_REUSEPORT_SOCKARRAY maps",
            Feature::Atomics => "BPF atomic fetch-and-add",
            Feature::MmapableArrays => "memory-mappable BPF arrays (BPF_F_MMAPABLE)",
            Feature::RingBuffer => "BPF ring buffers",
            Feature::Migration => "listener migration (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)",
        }
    }

    /// The mainline release that brought it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::SkReuseportProgram | Feature::ReuseportSockarray => "4.19",
            Feature::MmapableArrays => "5.5",
            Feature::RingBuffer => "5.8",
            Feature::Atomics => "5.12",
            Feature::Migration => "5.14",
        }
    }

    /// Whether the steering program cannot run without it. Without
    /// migration it runs, attached for selection only.
    pub fn required(self) -> bool {
        self != Feature::Migration
    }

    /// The name a test may give in `REUSEPORT_PROBE_HIDE` (debug builds).
    fn key(self) -> &'static str {
        match self {
            Feature::SkReuseportProgram => "sk_reuseport",
            Feature::ReuseportSockarray => "sockarray",
            Feature::Atomics => "atomics",
            Feature::MmapableArrays => "mmapable",
            Feature::RingBuffer => "ringbuf",
            Feature::Migration => "migrate",
        }
    }

    fn probe(self) -> bool {
        match self {
            Feature::SkReuseportProgram => {
                is_program_supported(ProgramType::SkReuseport).unwrap_or(false)
            }
            Feature::ReuseportSockarray => {
                is_map_supported(MapType::ReuseportSockArray).unwrap_or(false)
            }
            Feature::RingBuffer => is_map_supported(MapType::RingBuf).unwrap_or(false),
            Feature::MmapableArrays => raw::mmapable_array(),
            Feature::Atomics => raw::atomic_fetch_add(),
            Feature::Migration => raw::migration(),
        }
    }
}

/// What the running kernel offers, probed once per process.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    present: Vec<(Feature, bool)>,
}

impl KernelFeatures {
    /// Probes the kernel (once; later calls return the first answer).
    /// Probing loads programs and creates maps, so it needs the same
    /// privilege as the steering program (`CAP_BPF` or root); without it
    /// every feature reads as missing.
    pub fn probe() -> &'static KernelFeatures {
        static PROBED: OnceLock<KernelFeatures> = OnceLock::new();
        PROBED.get_or_init(|| {
            let hidden = hidden();
            KernelFeatures {
                present: Feature::ALL
                    .iter()
                    .map(|&f| (f, !hidden.contains(&f) && f.probe()))
                    .collect(),
            }
        })
    }

    /// Whether the kernel offers `feature`.
    pub fn has(&self, feature: Feature) -> bool {
        self.present
            .iter()
            .any(|&(f, present)| f == feature && present)
    }

    /// Each feature and whether it is there.
    pub fn iter(&self) -> impl Iterator<Item = (Feature, bool)> + '_ {
        self.present.iter().copied()
    }

    /// Fails with [`Error::KernelTooOld`], naming each missing feature and
    /// the release that brought it, unless every required feature is there.
    pub fn require(&self, what: &'static str) -> Result<()> {
        let missing: Vec<String> = self
            .iter()
            .filter(|&(f, present)| f.required() && !present)
            .map(|(f, _)| format!("{} (Linux {})", f.name(), f.since()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        Err(Error::KernelTooOld {
            found: release,
            missing: missing.join(", "),
            feature: what,
        })
    }
}

/// Features a test asks to treat as missing, in debug builds only:
/// `REUSEPORT_PROBE_HIDE=migrate,atomics`. This is how the tests reach the
/// select-only path, which no kernel within reach of the test matrix has
/// (every kernel without migration also lacks atomics). Release builds
/// ignore it.
fn hidden() -> Vec<Feature> {
    if !cfg!(debug_assertions) {
        return Vec::new();
    }
    let Ok(list) = std::env::var("REUSEPORT_PROBE_HIDE") else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|k| Feature::ALL.into_iter().find(|f| f.key() == k.trim()))
        .collect()
}

/// Probes written against `bpf(2)` directly.
mod raw {
    use std::os::fd::{FromRawFd, OwnedFd};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_F_MMAPABLE: u32 = 1 << 10;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
    const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

    /// The `union bpf_attr`, zeroed: 128 bytes cover every field the
    /// kernel reads for these commands (it checks that the bytes past the
    /// fields it knows are zero).
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(&mut self, offset: usize, v: u32) {
            self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        }
        fn u64(&mut self, offset: usize, v: u64) {
            self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// `bpf(cmd, attr)`; a returned descriptor is closed on drop.
    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> Option<OwnedFd> {
        // SAFETY: `attr` is a valid, writable buffer of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.0.as_mut_ptr(),
                std::mem::size_of::<Attr>() as libc::c_uint,
            )
        };
        // SAFETY: a non-negative return is a new descriptor of ours.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// One `struct bpf_insn`: opcode, dst (low nibble) and src registers,
    /// offset, immediate.
    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = (src << 4) | (dst & 0xf);
        b[2..4].copy_from_slice(&off.to_ne_bytes());
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        u64::from_ne_bytes(b)
    }

    const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
    const STX_DW: u8 = 0x03 | 0x60 | 0x18; // BPF_STX | BPF_MEM | BPF_DW
    const ATOMIC_DW: u8 = 0x03 | 0xc0 | 0x18; // BPF_STX | BPF_ATOMIC | BPF_DW
    const LDX_DW: u8 = 0x01 | 0x60 | 0x18; // BPF_LDX | BPF_MEM | BPF_DW
    const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT
    const BPF_ADD_FETCH: i32 = 0x01; // BPF_ADD | BPF_FETCH

    /// Loads a program of `prog_type` (attr layout: prog_type 0, insn_cnt 4,
    /// insns 8, license 16, expected_attach_type 68).
    fn load(prog_type: u32, expected_attach_type: u32, insns: &[u64]) -> bool {
        let license = c"GPL";
        let mut attr = Attr::new();
        attr.u32(0, prog_type);
        attr.u32(4, insns.len() as u32);
        attr.u64(8, insns.as_ptr() as u64);
        attr.u64(16, license.as_ptr() as u64);
        attr.u32(68, expected_attach_type);
        bpf(BPF_PROG_LOAD, &mut attr).is_some()
    }

    /// An array map with `BPF_F_MMAPABLE` (5.5): older kernels refuse the
    /// flag with `EINVAL` (attr: map_type 0, key_size 4, value_size 8,
    /// max_entries 12, map_flags 16).
    pub fn mmapable_array() -> bool {
        let mut attr = Attr::new();
        attr.u32(0, BPF_MAP_TYPE_ARRAY);
        attr.u32(4, 4);
        attr.u32(8, 8);
        attr.u32(12, 1);
        attr.u32(16, BPF_F_MMAPABLE);
        bpf(BPF_MAP_CREATE, &mut attr).is_some()
    }

    /// A socket filter doing one 64-bit atomic fetch-and-add on its stack
    /// (5.12; before that the verifier refuses `BPF_FETCH`: "BPF_XADD uses
    /// reserved fields").
    pub fn atomic_fetch_add() -> bool {
        load(
            BPF_PROG_TYPE_SOCKET_FILTER,
            0,
            &[
                insn(MOV64_IMM, 1, 0, 0, 0),
                insn(STX_DW, 10, 1, -8, 0),
                insn(MOV64_IMM, 1, 0, 0, 1),
                insn(ATOMIC_DW, 10, 1, -8, BPF_ADD_FETCH),
                insn(MOV64_IMM, 0, 0, 0, 0),
                insn(EXIT, 0, 0, 0, 0),
            ],
        )
    }

    /// An `SK_REUSEPORT` program for `SELECT_OR_MIGRATE` that reads the
    /// context's `migrating_sk` (offset 48 of `struct sk_reuseport_md`),
    /// both 5.14: older verifiers refuse the read as an invalid context
    /// access.
    pub fn migration() -> bool {
        load(
            BPF_PROG_TYPE_SK_REUSEPORT,
            BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
            &[
                insn(LDX_DW, 2, 1, 48, 0),
                insn(MOV64_IMM, 0, 0, 0, 1), // SK_PASS
                insn(EXIT, 0, 0, 0, 0),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine the unit tests run on (as root) has every feature; the
    /// VM matrix checks an old kernel.
    #[test]
    fn this_kernel_has_every_feature() {
        let f = KernelFeatures {
            present: Feature::ALL.iter().map(|&f| (f, f.probe())).collect(),
        };
        for (feature, present) in f.iter() {
            assert!(present, "{} is missing", feature.name());
        }
        assert!(f.require("the test").is_ok());
    }

    #[test]
    fn missing_required_features_are_named_with_their_release() {
        let f = KernelFeatures {
            present: Feature::ALL
                .iter()
                .map(|&f| (f, !matches!(f, Feature::Atomics | Feature::Migration)))
                .collect(),
        };
        let err = f.require("the steering program").unwrap_err().to_string();
        assert!(
            err.contains("BPF atomic fetch-and-add (Linux 5.12)"),
            "{err}"
        );
        // Migration is optional: not named among what is missing.
        assert!(!err.contains("migration"), "{err}");
    }
}
