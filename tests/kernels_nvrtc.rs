//! Every embedded kernel compiles with NVRTC for sm_80 and sm_90a (the `*_sm90.cu` files for sm_90a
//! only), and no attention kernel spills.
//! Needs NVRTC only (no GPU). Without it the test says "skipped: no NVRTC"; with
//! FLASHJVP_REQUIRE_NVRTC=1 (set by .ci/run) it fails instead.
#![cfg(feature = "cuda")]

use flashjvp::cuda::{nvrtc, nvrtc_or_skip};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90a() {
    if !nvrtc_or_skip() {
        return;
    }
    let files = nvrtc::kernel_files();
    assert!(!files.is_empty(), "no kernel sources embedded");
    let mut failures = Vec::new();
    for file in &files {
        for arch in ["sm_80", "sm_90a"] {
            if !nvrtc::file_supports_arch(file, arch) {
                println!("{arch} {file}: skipped (built for sm_90a only)");
                continue;
            }
            match nvrtc::compile(file, arch) {
                Ok(c) => {
                    assert!(
                        !c.kernels.is_empty(),
                        "{file} [{arch}]: no kernels in the ptxas report"
                    );
                    for k in &c.kernels {
                        println!(
                            "{arch} {:44} regs {:3} spill {:5} stack {:5} smem {:6}",
                            k.kernel, k.registers, k.spill_bytes, k.stack_bytes, k.shared_bytes
                        );
                        if k.kernel.starts_with("attention") && k.spill_bytes > 0 {
                            failures.push(format!(
                                "{} [{arch}] spills {} bytes",
                                k.kernel, k.spill_bytes
                            ));
                        }
                    }
                }
                Err(e) => failures.push(format!("{file} [{arch}]: {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernel failures:\n{}",
        failures.join("\n")
    );
}
