//! The eBPF objects `build.rs` builds.
//!
//! [`PRODUCTION`] is the object every group loads: the steering program
//! (`steer`, and `steer_select` for kernels without listener migration)
//! and its maps, nothing else. The test object (`TEST`, feature
//! `test-programs`) has the same programs and maps plus the benchmark's
//! reference programs (the cost floor and the cost of each step alone) and
//! a program the verifier rejects; only this project's benchmark and tests
//! load it.

use std::{borrow::Cow, fmt};

/// The production object, aligned as aya requires.
pub static PRODUCTION: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-ebpf"));

/// The test object (see the module's documentation).
#[cfg(feature = "test-programs")]
pub static TEST: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-ebpf-test"));

/// The bytes of an eBPF object to load: the production one unless a
/// benchmark or test asks for another.
#[derive(Clone, PartialEq, Eq)]
pub struct Object(Cow<'static, [u8]>);

impl Object {
    /// An object from its bytes (an ELF file of BPF code).
    #[cfg(feature = "internals")]
    pub fn new(bytes: impl Into<Cow<'static, [u8]>>) -> Self {
        Object(bytes.into())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Default for Object {
    fn default() -> Self {
        Object(Cow::Borrowed(PRODUCTION))
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.as_ptr() == PRODUCTION.as_ptr() {
            f.write_str("Object(production)")
        } else {
            write!(f, "Object({} bytes)", self.0.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport_common::program;

    /// The program names aya finds in an object.
    fn programs(object: &[u8]) -> Vec<String> {
        let obj = aya_obj::Object::parse(object).expect("a BPF object aya can parse");
        let mut names: Vec<String> = obj.programs.keys().cloned().collect();
        names.sort();
        names
    }

    #[test]
    fn the_production_object_holds_the_steering_programs_only() {
        assert_eq!(
            programs(PRODUCTION),
            [program::STEER, program::STEER_SELECT]
        );
    }

    #[cfg(feature = "test-programs")]
    #[test]
    fn the_test_object_adds_the_reference_and_rejected_programs() {
        let names = programs(TEST);
        for p in [
            program::STEER,
            program::STEER_SELECT,
            program::FLOOR,
            program::VERIFIER_REJECT,
        ] {
            assert!(names.iter().any(|n| n == p), "{p} in {names:?}");
        }
    }
}
