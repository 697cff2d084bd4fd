//! Run-time compilation of the embedded kernels with NVRTC, down to machine code (CUBIN) for one
//! architecture, with the assembler's resource report parsed per kernel. Compiled modules are
//! cached in memory per (source hash, arch); `flashjvp kernels` uses `compile` for every file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::sys;

use super::sources::SOURCES;
use crate::error::{Error, Result};

/// What the assembler reported for one kernel on one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// The kernel's (`extern "C"`, unmangled) entry name.
    pub kernel: String,
    /// The architecture it was compiled for (`sm_80`, `sm_90a`, ...).
    pub arch: String,
    /// Registers per thread (0 when the report had no `Used N registers` line).
    pub registers: u32,
    /// Spill stores plus spill loads, in bytes.
    pub spill_bytes: u64,
    /// Stack frame per thread, in bytes.
    pub stack_bytes: u64,
    /// Static shared memory; dynamic shared memory is set per launch (see each kernel's header).
    pub shared_bytes: u64,
}

/// One source file compiled for one architecture.
#[derive(Clone, Debug)]
pub struct CompiledFile {
    /// The kernel file's name (`elementwise.cu`, ...).
    pub file: String,
    /// The architecture it was compiled for (`sm_80`, `sm_90a`, ...).
    pub arch: String,
    /// The machine code, ready for the driver's module loader.
    pub cubin: Vec<u8>,
    /// NVRTC's program log (warnings and the assembler's `-v` report; may be empty).
    pub log: String,
    /// Per-kernel resources parsed from `log`, in the order the assembler reported them.
    pub kernels: Vec<KernelResources>,
}

/// The kernel files (.cu) embedded in this build.
pub fn kernel_files() -> Vec<&'static str> {
    SOURCES
        .iter()
        .filter(|(name, _)| name.ends_with(".cu"))
        .map(|(name, _)| *name)
        .collect()
}

/// Whether `file` is compiled for `arch` (an `sm_XY[a]` or `compute_XY[a]` name): files named
/// `*_sm90.cu` use wgmma and setmaxnreg, which only the sm_90a target has; every other file is built
/// for every architecture.
pub fn file_supports_arch(file: &str, arch: &str) -> bool {
    if file.ends_with("_sm90.cu") {
        arch.ends_with("_90a")
    } else {
        true
    }
}

/// The kernel files compiled for `arch` (see [`file_supports_arch`]).
pub fn kernel_files_for(arch: &str) -> Vec<&'static str> {
    kernel_files()
        .into_iter()
        .filter(|f| file_supports_arch(f, arch))
        .collect()
}

fn headers() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    SOURCES.iter().filter(|(name, _)| name.ends_with(".cuh"))
}

/// The architecture name NVRTC wants for a device of compute capability `major.minor`:
/// sm_90a on Hopper (wgmma and setmaxnreg need the `a` target), sm_XY elsewhere.
pub fn arch_for_capability(major: u32, minor: u32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// FNV-1a over the source and every header: the cache key of a compiled module.
fn source_hash(source: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (_, text) in headers() {
        for b in text.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    for b in source.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

type Cache = Mutex<HashMap<(u64, String), Arc<CompiledFile>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn nvrtc_err(what: &str, file: &str, r: sys::nvrtcResult) -> Error {
    Error::Cuda(format!("NVRTC {what} failed for {file}: {r:?}"))
}

/// The environment variable that asks for the Hopper kernels' diagnostic build: a wait on an
/// mbarrier longer than this many milliseconds prints where it hangs and traps (see
/// cuda/attention_jvp_sm90.cu). Unset (the normal build): no watchdog.
pub const SM90_WATCHDOG_ENV: &str = "FLASHJVP_SM90_WATCHDOG";

/// The watchdog's limit in milliseconds from [`SM90_WATCHDOG_ENV`]: None when unset, else
/// [`parse_watchdog_ms`] of its value.
pub fn sm90_watchdog_ms() -> Result<Option<u32>> {
    std::env::var(SM90_WATCHDOG_ENV)
        .ok()
        .map(|v| parse_watchdog_ms(&v))
        .transpose()
}

/// A watchdog limit: a whole number of milliseconds in 1..=600000, else an error naming the variable.
pub fn parse_watchdog_ms(v: &str) -> Result<u32> {
    match v.trim().parse::<u32>() {
        Ok(ms @ 1..=600_000) => Ok(ms),
        _ => Err(Error::Unsupported(format!(
            "{SM90_WATCHDOG_ENV}={v:?}: expected milliseconds, 1 to 600000"
        ))),
    }
}

/// The embedded source of the kernel file `file`.
pub(crate) fn embedded(file: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, text)| *text)
        .ok_or_else(|| Error::Unsupported(format!("no embedded kernel file `{file}`")))
}

/// The text NVRTC compiles for `file`: the embedded source, or, for a Hopper file (`*_sm90.cu`) with
/// a watchdog limit, its diagnostic build: the watchdog's define in front (a different text, so the
/// caches keep the two builds apart) and `#line 1` to keep the file's line numbers.
pub fn source_text_with(file: &str, watchdog_ms: Option<u32>) -> Result<Cow<'static, str>> {
    source_text_for(file, watchdog_ms, false)
}

/// [`source_text_with`], and for a Hopper file with `split_wait` the define of the split schedule
/// (`FJ_SM90_SPLIT_WAIT`, cuda/hopper.cuh SCHEDULE) in front as well.
pub fn source_text_for(
    file: &str,
    watchdog_ms: Option<u32>,
    split_wait: bool,
) -> Result<Cow<'static, str>> {
    source_text_built(file, watchdog_ms, split_wait, false)
}

/// [`source_text_for`], and for a Hopper file with `keys64` the define that puts the JVP at head dims
/// 64 and 72 and the forward at every head dim on 64-key tiles (`FJ_SM90_KEYS64`,
/// attention_jvp_sm90.cu) in front as well.
pub fn source_text_built(
    file: &str,
    watchdog_ms: Option<u32>,
    split_wait: bool,
    keys64: bool,
) -> Result<Cow<'static, str>> {
    let source = embedded(file)?;
    if !file.ends_with("_sm90.cu") || (watchdog_ms.is_none() && !split_wait && !keys64) {
        return Ok(source.into());
    }
    let mut text = String::new();
    if split_wait {
        text.push_str("#define FJ_SM90_SPLIT_WAIT 1\n");
    }
    if keys64 {
        text.push_str("#define FJ_SM90_KEYS64 1\n");
    }
    if let Some(ms) = watchdog_ms {
        text.push_str(&format!("#define FJ_SM90_WATCHDOG_MS {ms}\n"));
    }
    text.push_str(&format!("#line 1 \"{file}\"\n{source}"));
    Ok(text.into())
}

/// The environment variable that picks the Hopper kernels' wgmma schedule: `split` (the score
/// products waited for apart from the older value/gradient products, cuda/hopper.cuh SCHEDULE) or
/// `joined` (the default: one wait per turn).
pub const SM90_SCHEDULE_ENV: &str = "FLASHJVP_SM90_SCHEDULE";

/// Whether [`SM90_SCHEDULE_ENV`] asks for the split schedule (an error naming the variable for a
/// value other than `split` or `joined`).
pub fn sm90_split_wait() -> Result<bool> {
    parse_schedule(std::env::var(SM90_SCHEDULE_ENV).ok().as_deref())
}

/// A value of [`SM90_SCHEDULE_ENV`] (unset or empty: the default): whether it is the split schedule.
pub fn parse_schedule(v: Option<&str>) -> Result<bool> {
    match v.map(str::trim) {
        None | Some("") | Some("joined") => Ok(false),
        Some("split") => Ok(true),
        Some(v) => Err(Error::Unsupported(format!(
            "{SM90_SCHEDULE_ENV}={v:?}: expected `split` or `joined`"
        ))),
    }
}

/// The environment variable that picks the Hopper kernels' key tiles at head dims 64 and 72: `long` (the
/// default: 96 and 80 keys for the JVP, 128 for the forward) or `64` (the tile of the other head
/// dims, which the H200 timed, kept to time the two side by side).
pub const SM90_KEYS_ENV: &str = "FLASHJVP_SM90_KEYS";

/// Whether [`SM90_KEYS_ENV`] asks for 64-key tiles at head dims 64 and 72 (an error naming the
/// variable for a value other than `64` or `long`).
pub fn sm90_keys64() -> Result<bool> {
    parse_keys(std::env::var(SM90_KEYS_ENV).ok().as_deref())
}

/// A value of [`SM90_KEYS_ENV`] (unset or empty: the default, long tiles): whether it asks for
/// 64-key tiles.
pub fn parse_keys(v: Option<&str>) -> Result<bool> {
    match v.map(str::trim) {
        None | Some("") | Some("long") => Ok(false),
        Some("64") => Ok(true),
        Some(v) => Err(Error::Unsupported(format!(
            "{SM90_KEYS_ENV}={v:?}: expected `64` or `long`"
        ))),
    }
}

/// [`source_text_built`] with the watchdog limit ([`SM90_WATCHDOG_ENV`]), schedule
/// ([`SM90_SCHEDULE_ENV`]) and key tiles ([`SM90_KEYS_ENV`]) the environment asks for, all
/// read for the Hopper files only.
pub fn source_text(file: &str) -> Result<Cow<'static, str>> {
    if file.ends_with("_sm90.cu") {
        source_text_built(
            file,
            sm90_watchdog_ms()?,
            sm90_split_wait()?,
            sm90_keys64()?,
        )
    } else {
        source_text_for(file, None, false)
    }
}

/// Compiles one embedded kernel file for `arch` (e.g. "sm_80", "sm_90a"), cached per (source hash,
/// arch). A compile error comes back as an error carrying NVRTC's log.
pub fn compile(file: &str, arch: &str) -> Result<Arc<CompiledFile>> {
    compile_text(file, &source_text(file)?, arch)
}

/// Compiles `source` (the text of the embedded kernel file `file`, as [`source_text_with`] gives
/// it) for `arch`, cached per (source hash, arch).
pub fn compile_text(file: &str, source: &str, arch: &str) -> Result<Arc<CompiledFile>> {
    if !arch.starts_with("sm_") || arch.len() < 5 {
        return Err(Error::Unsupported(format!(
            "architecture `{arch}`: expected a name like sm_80 or sm_90a"
        )));
    }
    if !super::nvrtc_present() {
        return Err(Error::Unsupported(
            "NVRTC (libnvrtc.so.13) not found: install it (see README) or put it on LD_LIBRARY_PATH".into(),
        ));
    }
    let key = (source_hash(source), arch.to_string());
    if let Some(hit) = cache().lock().expect("kernel cache lock").get(&key) {
        return Ok(hit.clone());
    }
    let compiled = Arc::new(compile_uncached(file, source, arch)?);
    cache()
        .lock()
        .expect("kernel cache lock")
        .insert(key, compiled.clone());
    Ok(compiled)
}

fn compile_uncached(file: &str, source: &str, arch: &str) -> Result<CompiledFile> {
    let cstr =
        |s: &str| CString::new(s).map_err(|_| Error::Cuda(format!("{file}: NUL byte in source")));
    let src = cstr(source)?;
    let name = cstr(file)?;
    let header_bodies: Vec<CString> = headers().map(|(_, b)| cstr(b)).collect::<Result<_>>()?;
    let header_names: Vec<CString> = headers().map(|(n, _)| cstr(n)).collect::<Result<_>>()?;
    let body_ptrs: Vec<*const c_char> = header_bodies.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let options = [
        format!("--gpu-architecture={arch}"),
        "-default-device".into(),
        "--std=c++17".into(),
        "-lineinfo".into(),
        "--ptxas-options=-v".into(),
    ];
    let options: Vec<CString> = options.iter().map(|o| cstr(o)).collect::<Result<_>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|c| c.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string alive for the whole block; the
    // program is destroyed on every path after creation.
    unsafe {
        let r = sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            body_ptrs.len() as i32,
            body_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        );
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(nvrtc_err("nvrtcCreateProgram", file, r));
        }
        let compiled =
            sys::nvrtcCompileProgram(prog, option_ptrs.len() as i32, option_ptrs.as_ptr());
        let log = program_log(prog);
        let cubin = if compiled == sys::nvrtcResult::NVRTC_SUCCESS {
            program_cubin(prog)
        } else {
            Err(nvrtc_err("nvrtcCompileProgram", file, compiled))
        };
        sys::nvrtcDestroyProgram(&mut prog);
        let cubin = cubin.map_err(|e| Error::Cuda(format!("{e}\n{log}")))?;
        let kernels = parse_ptxas_report(&log, arch);
        Ok(CompiledFile {
            file: file.to_string(),
            arch: arch.to_string(),
            cubin,
            log,
            kernels,
        })
    }
}

unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char)
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_string()
}

unsafe fn program_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    let r = sys::nvrtcGetCUBINSize(prog, &mut size);
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBINSize", "program", r));
    }
    let mut buf = vec![0u8; size];
    let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char);
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(nvrtc_err("nvrtcGetCUBIN", "program", r));
    }
    Ok(buf)
}

/// Per-kernel resources from the `--ptxas-options=-v` lines of an NVRTC log:
/// `Compiling entry function 'K' for 'sm_80'`, then `N bytes stack frame, S bytes spill stores,
/// L bytes spill loads` and `Used R registers, ... B bytes smem ...`.
pub fn parse_ptxas_report(log: &str, arch: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                kernel,
                arch: arch.to_string(),
                registers: 0,
                spill_bytes: 0,
                stack_bytes: 0,
                shared_bytes: 0,
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            cur.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_bytes = number_before(line, "bytes spill stores").unwrap_or(0)
                + number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers").unwrap_or(0) as u32;
            cur.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The integer that stands right before `marker` in `line`.
fn number_before(line: &str, marker: &str) -> Option<u64> {
    let head = &line[..line.find(marker)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'attention_jvp_bf16_d64' for 'sm_80'\n\
ptxas info    : Function properties for attention_jvp_bf16_d64\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 16384 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k2' for 'sm_80'\n\
ptxas info    : Function properties for k2\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 32 registers, 380 bytes cmem[0]\n";
        let r = parse_ptxas_report(log, "sm_80");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kernel, "attention_jvp_bf16_d64");
        assert_eq!(
            (
                r[0].registers,
                r[0].spill_bytes,
                r[0].stack_bytes,
                r[0].shared_bytes
            ),
            (168, 16, 8, 16384)
        );
        assert_eq!(
            (r[1].registers, r[1].spill_bytes, r[1].shared_bytes),
            (32, 0, 0)
        );
    }

    #[test]
    fn sm90_files_are_sm90a_only() {
        assert!(file_supports_arch("attention_jvp_sm90.cu", "sm_90a"));
        assert!(file_supports_arch("attention_jvp_sm90.cu", "compute_90a"));
        assert!(!file_supports_arch("attention_jvp_sm90.cu", "sm_80"));
        assert!(!file_supports_arch("attention_jvp_sm90.cu", "sm_90"));
        assert!(file_supports_arch("attention_jvp.cu", "sm_80"));
        assert!(kernel_files_for("sm_80")
            .iter()
            .all(|f| !f.ends_with("_sm90.cu")));
        assert!(kernel_files_for("sm_90a").contains(&"attention_jvp_sm90.cu"));
    }

    #[test]
    fn build_variables_parse_or_name_themselves() {
        assert!(!parse_keys(None).unwrap());
        assert!(parse_keys(Some(" 64 ")).unwrap());
        assert!(!parse_keys(Some("")).unwrap());
        assert!(!parse_keys(Some("long")).unwrap());
        for bad in ["48", "96", "abc"] {
            let e = parse_keys(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("FLASHJVP_SM90_KEYS") && e.contains("`64` or `long`"),
                "{e}"
            );
        }
        assert!(!parse_schedule(None).unwrap());
        assert!(parse_schedule(Some("split")).unwrap());
        assert!(!parse_schedule(Some("joined")).unwrap());
        let e = parse_schedule(Some("fast")).unwrap_err().to_string();
        assert!(
            e.contains("FLASHJVP_SM90_SCHEDULE") && e.contains("split"),
            "{e}"
        );
    }

    #[test]
    fn hopper_gets_the_a_target() {
        assert_eq!(arch_for_capability(9, 0), "sm_90a");
        assert_eq!(arch_for_capability(8, 6), "sm_86");
    }
}
