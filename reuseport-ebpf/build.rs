//! Build settings of the eBPF object.
use which::which;

fn main() {
    // Rebuild when bpf-linker changes: it is the code generator of the
    // `bpfel-unknown-none` target (it runs LLVM on the whole program).
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`")
        }
    }
    // BPF ISA v3 (Linux 5.1+ for its jumps, 5.12+ for atomics): round robin
    // and weighted need an atomic fetch-and-add, which "generic" (v1) lacks.
    // The target's rustflags are set by aya-build, so pass it to the linker,
    // which does the code generation.
}
