//! Arbitrary bytes into the safetensors reader and, when they parse, into the CLI's op dispatch
//! (`flashjvp::cli::run`) for every mode and op: malformed files and ill-fitting tensors must come
//! back as errors, never as a panic.
#![no_main]

use flashjvp::cli::{self, Mode, OpKind};
use flashjvp::{io, DType, Device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(map) = io::parse_safetensors(data, "fuzz") else {
        return;
    };
    // What parsed must survive a round trip unchanged (NaN payloads included: compare bytes).
    let bytes = io::serialize_safetensors(map.iter().map(|(n, t)| (n.as_str(), t)))
        .expect("a parsed file serializes");
    let again = io::parse_safetensors(&bytes, "round trip").expect("a written file parses");
    assert_eq!(
        io::serialize_safetensors(again.iter().map(|(n, t)| (n.as_str(), t))).unwrap(),
        bytes
    );
    for mode in Mode::ALL {
        for op in OpKind::ALL {
            for dtype in [None, Some(DType::F64), Some(DType::BF16)] {
                if let Ok(out) = cli::run(mode, op, &map, dtype, Device::Cpu) {
                    // Every output the contract lists, nothing else.
                    let names: Vec<&str> = out.keys().map(String::as_str).collect();
                    let mut want = op.outputs(mode).to_vec();
                    want.sort();
                    assert_eq!(names, want);
                }
            }
        }
    }
});
