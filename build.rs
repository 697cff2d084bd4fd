//! Embeds every kernel source under cuda/ into the binary (NVRTC compiles them at run time), so
//! adding a .cu file needs no Rust change. Headers (.cuh) are embedded too and inlined at their
//! `#include "..."` before compilation.

use std::fmt::Write;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("cu") | Some("cuh")
        )
    });
    files.sort();
    let mut out = String::from("/// (file name, source) of every kernel file and header under cuda/.\npub const SOURCES: &[(&str, &str)] = &[\n");
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().unwrap().to_string_lossy();
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            p.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    std::fs::write(dest, out).unwrap();
}
