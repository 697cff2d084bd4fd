//! Every embedded kernel compiles with NVRTC for sm_80 and sm_90a (the `*_sm90.cu` files for sm_90a
//! only), and no attention kernel spills; the Hopper file's watchdog build compiles too, and the
//! sm_80 attention kernels for the archs with 99 KiB of shared memory per block (sm_89, sm_120).
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
            // The normal build whatever FLASHJVP_SM90_WATCHDOG says (its diagnostic build spills).
            let source = nvrtc::source_text_with(file, None).expect("embedded");
            match nvrtc::compile_text(file, &source, arch) {
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
                        if flashjvp::cuda::attention_sm90::uses_register_pool(file, &k.kernel) {
                            if let Err(e) = flashjvp::cuda::attention_sm90::check_register_pool(
                                &k.kernel,
                                k.registers,
                            ) {
                                failures.push(format!("[{arch}] {e}"));
                            }
                        }
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

#[test]
fn the_sm90_watchdog_build_compiles_with_its_report() {
    // The diagnostic build check.sh falls back to after a hang: the same kernels, plus the report
    // (its format string lands in the CUBIN). Other files are never changed by the watchdog.
    assert!(nvrtc::parse_watchdog_ms("0").is_err());
    assert!(nvrtc::parse_watchdog_ms("2s").is_err());
    assert_eq!(nvrtc::parse_watchdog_ms(" 2000 ").unwrap(), 2000);
    let plain = nvrtc::source_text_with("layernorm_mod.cu", Some(2000)).unwrap();
    assert_eq!(
        plain,
        nvrtc::source_text_with("layernorm_mod.cu", None).unwrap()
    );
    if !nvrtc_or_skip() {
        return;
    }
    let file = "attention_jvp_sm90.cu";
    let watchdog = nvrtc::source_text_with(file, Some(2000)).unwrap();
    assert!(watchdog.starts_with("#define FJ_SM90_WATCHDOG_MS 2000\n"));
    let normal = nvrtc::compile_text(
        file,
        &nvrtc::source_text_with(file, None).unwrap(),
        "sm_90a",
    )
    .expect("normal build");
    let diag = nvrtc::compile_text(file, &watchdog, "sm_90a").expect("watchdog build");
    let names = |c: &nvrtc::CompiledFile| {
        let mut v: Vec<String> = c.kernels.iter().map(|k| k.kernel.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&normal), names(&diag), "the same kernels");
    let needle = b"flashjvp sm90 watchdog";
    let has = |c: &nvrtc::CompiledFile| c.cubin.windows(needle.len()).any(|w| w == needle);
    assert!(has(&diag), "the watchdog build carries its report");
    assert!(!has(&normal), "the normal build has no watchdog");
}

#[test]
fn the_split_schedule_compiles_without_spills_or_serialised_wgmma() {
    // FLASHJVP_SM90_SCHEDULE=split: the Hopper files with FJ_SM90_SPLIT_WAIT (cuda/hopper.cuh
    // SCHEDULE), a text of their own; the other files never change.
    let plain = nvrtc::source_text_for("layernorm_mod.cu", None, true).unwrap();
    assert_eq!(
        plain,
        nvrtc::source_text_for("layernorm_mod.cu", None, false).unwrap()
    );
    let both = nvrtc::source_text_for("attention_bwd_sm90.cu", Some(500), true).unwrap();
    assert!(both.starts_with(
        "#define FJ_SM90_SPLIT_WAIT 1\n#define FJ_SM90_WATCHDOG_MS 500\n#line 1 \"attention_bwd_sm90.cu\"\n"
    ));
    if !nvrtc_or_skip() {
        return;
    }
    for file in [
        flashjvp::cuda::attention_sm90::FILE,
        flashjvp::cuda::attention_sm90::BWD_FILE,
    ] {
        let split = nvrtc::source_text_for(file, None, true).unwrap();
        let c = nvrtc::compile_text(file, &split, "sm_90a").expect("split build");
        let normal = nvrtc::compile_text(file, &nvrtc::source_text(file).unwrap(), "sm_90a")
            .expect("normal build");
        assert_eq!(c.kernels.len(), normal.kernels.len(), "{file}");
        assert_clean_sm90_build(&c, &format!("{file}, split build"));
    }
}

/// A Hopper build variant: no attention kernel spills or has a stack frame, each fits the consumers'
/// register pool, and ptxas warns of nothing (it says so, C7510 / "wgmma ... serialized", when it cannot
/// keep the wgmma pipeline).
fn assert_clean_sm90_build(c: &nvrtc::CompiledFile, what: &str) {
    for k in c
        .kernels
        .iter()
        .filter(|k| k.kernel.starts_with("attention_"))
    {
        assert_eq!(
            (k.spill_bytes, k.stack_bytes),
            (0, 0),
            "{what}, {}: spills or a stack frame",
            k.kernel
        );
        flashjvp::cuda::attention_sm90::check_register_pool(&k.kernel, k.registers).unwrap();
    }
    let log = c.log.to_lowercase();
    assert!(
        !log.contains("serializ") && !log.contains("warning"),
        "{what}: {}",
        c.log
    );
}

#[test]
fn the_64_key_tile_build_compiles_without_spills() {
    // FLASHJVP_SM90_KEYS=64: the Hopper JVP at d 64 and 72 on 64-key tiles (FJ_SM90_KEYS64, kept to time
    // against the default 96 and 80); the default is the embedded text itself.
    let file = flashjvp::cuda::attention_sm90::FILE;
    assert_eq!(
        nvrtc::source_text_built(file, None, false, false).unwrap(),
        nvrtc::source_text_for(file, None, false).unwrap()
    );
    let text = nvrtc::source_text_built(file, None, false, true).unwrap();
    assert!(text.starts_with("#define FJ_SM90_KEYS64 1\n#line 1 \"attention_jvp_sm90.cu\"\n"));
    if !nvrtc_or_skip() {
        return;
    }
    let c = nvrtc::compile_text(file, &text, "sm_90a").expect("64-key tile build");
    assert_clean_sm90_build(&c, "the 64-key-tile build");
}

#[test]
fn the_attention_kernels_compile_for_small_shared_memory_archs() {
    // sm_86, sm_89 and sm_12x allow 99 KiB of shared memory per block: there the forward/JVP kernels
    // take shorter key tiles (attention_jvp.cuh, SMALL SHARED MEMORY: FJ_SMEM_SMALL from
    // __CUDA_ARCH__, whose static_assert fails the compile if a kernel's tiles do not fit). They
    // compile without spills for sm_89 (Ada; sm_86 takes the same tiles) and sm_120 (Blackwell, the
    // dv == d file); the host's tiles are checked in the unit tests and on the emulator
    // (FLASHJVP_EMULATE=sm_89).
    if !nvrtc_or_skip() {
        return;
    }
    let mut failures = Vec::new();
    for (arch, file) in [
        ("sm_89", "attention_jvp.cu"),
        ("sm_89", "attention_jvp_dv.cu"),
        ("sm_120", "attention_jvp.cu"),
    ] {
        assert!(flashjvp::cuda::attention::small_shared_memory(arch));
        let source = nvrtc::source_text_with(file, None).expect("embedded");
        match nvrtc::compile_text(file, &source, arch) {
            Ok(c) => {
                assert!(!c.kernels.is_empty(), "{file} [{arch}]: no kernels");
                for k in c.kernels.iter().filter(|k| k.spill_bytes > 0) {
                    failures.push(format!(
                        "{} [{arch}] spills {} bytes",
                        k.kernel, k.spill_bytes
                    ));
                }
            }
            Err(e) => failures.push(format!("{file} [{arch}]: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
