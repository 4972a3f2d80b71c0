//! Builds every kernel twice from the same source:
//! - always: with the host C++ compiler and `CDCL_EMULATE`, into the CPU emulator library
//!   (`cdcl_emu_*` launchers), optimised even in debug builds;
//! - when nvcc is found: with nvcc for the GPU (`cdcl_cuda_*` launchers), SASS for
//!   `CDCL_CUDA_ARCHS` plus PTX of the newest, the CUDA runtime linked statically, and nvcc's
//!   output (ptxas resource report included) saved where tests/ptxas.rs reads it.
//!
//! Without nvcc the crate still builds and runs on the emulator; one warning says so.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,86,89,90";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = manifest.join("kernels");

    println!("cargo:rustc-check-cfg=cfg(cdcl_cuda)");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "CDCL_CUDA_ARCHS", "CDCL_NO_CUDA", "CDCL_ASAN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let cu_files = list_files(&kernels, "cu");
    build_emulator(&kernels, &cu_files, &out);

    let report_dir = out.join("nvcc-report");
    let _ = fs::remove_dir_all(&report_dir);
    fs::create_dir_all(&report_dir).expect("create the nvcc report directory in OUT_DIR");
    println!("cargo:rustc-env=CDCL_NVCC_REPORT_DIR={}", report_dir.display());
    // The nvcc objects (tests/sass.rs disassembles them when cuobjdump is available); the
    // directory only exists when the GPU build ran.
    let obj_dir = out.join("cuda-obj");
    let _ = fs::remove_dir_all(&obj_dir);
    println!("cargo:rustc-env=CDCL_CUDA_OBJ_DIR={}", obj_dir.display());

    if env::var_os("CDCL_NO_CUDA").is_some() {
        println!("cargo:warning=CDCL_NO_CUDA is set: building the emulator only (Device::cuda will return Error::CudaNotBuilt)");
        return;
    }
    match find_nvcc() {
        Some(nvcc) => {
            // Where tests/sass.rs looks for cuobjdump after CUOBJDUMP and PATH.
            println!("cargo:rustc-env=CDCL_NVCC_BIN_DIR={}", nvcc.parent().unwrap_or(Path::new(".")).display());
            build_cuda(&nvcc, &kernels, &cu_files, &out, &report_dir)
        }
        None => println!(
            "cargo:warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH): building the emulator only; Device::cuda will return Error::CudaNotBuilt"
        ),
    }
}

fn list_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == ext));
    files.sort();
    files
}

fn asan_enabled() -> bool {
    env::var_os("CARGO_FEATURE_ASAN").is_some() || env::var_os("CDCL_ASAN").is_some()
}

fn build_emulator(kernels: &Path, cu_files: &[PathBuf], out: &Path) {
    let selftests = [kernels.join("emu/selftest.cu"), kernels.join("emu/selftest_rules.cu")];
    let bounds_cpp = out.join("emu_launch_bounds.cpp");
    write_launch_bounds(cu_files.iter().chain(selftests.iter()), &bounds_cpp);
    let base = |b: &mut cc::Build| {
        b.cpp(true)
            .std("c++17")
            // Emulated kernels are the test suite's hot loop: optimise them in every profile.
            .opt_level(2)
            .debug(false)
            .define("CDCL_EMULATE", None)
            .include(kernels)
            .flag("-x")
            .flag("c++")
            .flag_if_supported("-fno-strict-aliasing")
            // No contraction of a*b+c into fma, whatever the compiler's default for the host (gcc
            // contracts in GNU mode where the target has fma, clang by default): the emulator
            // rounds every operation, on every host alike. nvcc contracts (-fmad=true), so
            // emulator and GPU may differ by one rounding per multiply-add: docs/kernels.md,
            // "Bitwise claims".
            .flag_if_supported("-ffp-contract=off")
            .warnings(true)
            .extra_warnings(true);
        if asan_enabled() {
            b.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        }
    };
    // The kernel sources, instrumented for the emulator's memory checks (kernels/emu/racecheck.cpp
    // provides the hooks; no sanitizer runtime is linked): -fsanitize=alignment faults on a
    // misaligned access as the GPU does; -fsanitize=thread routes every load and store through the
    // race detector. ThreadSanitizer's instrumentation cannot be combined with AddressSanitizer's,
    // so an ASan build checks alignment only.
    let mut k = cc::Build::new();
    base(&mut k);
    k.flag("-fsanitize=alignment");
    if !asan_enabled() {
        k.flag("-fsanitize=thread");
        k.flag_if_supported("--param=tsan-instrument-func-entry-exit=0");
    }
    for f in cu_files {
        k.file(f);
    }
    for f in &selftests {
        k.file(f);
    }
    k.compile("cdcl_emu_kernels");
    // The runtime, not instrumented (it is what the instrumentation calls).
    let mut b = cc::Build::new();
    base(&mut b);
    if asan_enabled() {
        // rustc links with -nodefaultlibs, so gcc's -fsanitize=address would not add the runtime:
        // name it. It is not first in the library list; kernels/emu/emu.cpp's
        // __asan_default_options turns that check off.
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    b.file(kernels.join("emu/emu.cpp"));
    b.file(kernels.join("emu/racecheck.cpp"));
    b.file(kernels.join("emu/fiber.cpp"));
    b.file(&bounds_cpp);
    b.compile("cdcl_emu");
}

/// The emulator's table of `__launch_bounds__` (kernel name -> most threads per block), read from
/// the kernel sources: a C++ declaration cannot carry a value the launch could read, so the
/// bound is taken from the text. A bound is an integer literal or a `constexpr` integer of the
/// same file set to a literal; any other expression is listed with 0 (unchecked) and named in
/// a build warning.
fn write_launch_bounds<'a>(files: impl Iterator<Item = &'a PathBuf>, dest: &Path) {
    let mut rows = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(f) else { continue };
        let mut rest = text.as_str();
        while let Some(at) = rest.find("__launch_bounds__(") {
            let line_start = rest[..at].rfind('\n').map_or(0, |i| i + 1);
            let is_define = rest[line_start..at].trim_start().starts_with('#');
            rest = &rest[at + "__launch_bounds__(".len()..];
            let Some(close) = matching_paren(rest) else { break };
            let args = &rest[..close];
            rest = &rest[close + 1..];
            if is_define {
                continue;
            }
            let name: String =
                rest.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.is_empty() {
                continue;
            }
            let first = top_level_first_arg(args).trim();
            let value = first.parse::<u32>().ok().or_else(|| constexpr_value(&text, first));
            if value.is_none() {
                println!(
                    "cargo:warning=emulator: __launch_bounds__({first}) of `{name}` is not a literal; not checked"
                );
            }
            rows.push(format!("    {{\"{name}\", {}u}},", value.unwrap_or(0)));
        }
    }
    let src = format!(
        "// Generated by build.rs from the kernels' __launch_bounds__ (kernel, most threads per block).\n\
         namespace cdcl_emu {{\nnamespace rt {{\nstruct LaunchBound {{\n    const char* kernel;\n    unsigned max_threads;\n}};\n\
         extern const LaunchBound kLaunchBounds[] = {{\n{}\n    {{nullptr, 0u}},\n}};\n}}  // namespace rt\n}}  // namespace cdcl_emu\n",
        rows.join("\n")
    );
    fs::write(dest, src).expect("write the launch-bounds table");
}

fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn top_level_first_arg(args: &str) -> &str {
    let mut depth = 0;
    for (i, c) in args.char_indices() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => return &args[..i],
            _ => {}
        }
    }
    args
}

/// `constexpr <integer type> NAME = <literal>;` in `text`.
fn constexpr_value(text: &str, name: &str) -> Option<u32> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    text.lines().filter(|l| l.contains("constexpr")).find_map(|l| {
        let at = l.find(&format!(" {name} ="))?;
        let rhs = l[at + name.len() + 3..].trim().trim_end_matches(';').trim();
        rhs.trim_end_matches(['u', 'U']).parse().ok()
    })
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            if let Some(p) = exe(PathBuf::from(home).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).find_map(|d| exe(d.join("nvcc"))))
}

fn cuda_archs() -> Vec<String> {
    let archs = env::var("CDCL_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut v: Vec<String> = archs
        .split([',', ' ', ';'])
        .map(|s| s.trim().trim_start_matches("sm_").to_string())
        .filter(|s| !s.is_empty())
        .collect();
    v.sort_by_key(|s| s.parse::<u32>().unwrap_or(0));
    v.dedup();
    v
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn build_cuda(nvcc: &Path, kernels: &Path, cu_files: &[PathBuf], out: &Path, report_dir: &Path) {
    let archs = cuda_archs();
    let newest = archs.last().cloned().unwrap_or_else(|| "90".into());
    // What Device::cuda checks a GPU's compute capability against (src/device/cuda.rs).
    println!("cargo:rustc-env=CDCL_EMBEDDED_ARCHS={}", archs.join(","));
    let obj_dir = out.join("cuda-obj");
    fs::create_dir_all(&obj_dir).expect("create the CUDA object directory in OUT_DIR");
    let mut flags: Vec<String> = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC"]
        .iter()
        .chain(["-Xptxas", "-v", "-Xptxas", "-warn-spills", "-Xptxas", "-warn-lmem-usage"].iter())
        .map(|s| s.to_string())
        .collect();
    for a in &archs {
        flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    flags.push(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));

    // nvcc for four architectures is most of a cold build, and every target directory (debug,
    // release, the sanitizer build, clippy's) would repeat it: objects are kept by content —
    // nvcc's version, the flags, the file and every header under kernels/ — and compiled two or
    // more at a time.
    let cache = cuda_cache_dir(out);
    let version = Command::new(nvcc).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
    let headers = header_digest(kernels);
    let jobs: usize = env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(1).clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs.min(cu_files.len()).max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut failures = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(cu) = cu_files.get(i) else { break };
                        let key = Fingerprint::new()
                            .bytes(&version)
                            .bytes(flags.join("\0").as_bytes())
                            .bytes(&headers.to_le_bytes())
                            .bytes(&fs::read(cu).unwrap_or_default())
                            .finish();
                        if let Err(e) = compile_cached(nvcc, kernels, cu, &flags, key, &cache, &obj_dir, report_dir) {
                            failures.push(e);
                        }
                    }
                    failures
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("nvcc worker thread")).collect()
    });
    if let Some(e) = failures.first() {
        fail(e);
    }
    let objects: Vec<PathBuf> = cu_files
        .iter()
        .map(|cu| obj_dir.join(format!("{}.o", cu.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel"))))
        .collect();
    fs::write(report_dir.join("archs.txt"), archs.join(",")).expect("write the arch list");

    let mut b = cc::Build::new();
    b.cpp(true);
    for o in &objects {
        b.object(o);
    }
    b.compile("cdcl_cuda");

    let nvcc_bin = nvcc.parent().unwrap_or(Path::new("."));
    let root = nvcc_bin.parent().unwrap_or(Path::new("."));
    // Toolkit installs keep the runtime in lib64; the PyPI wheels (nvidia/cu13) in lib.
    let lib_dir = ["lib64", "lib", "lib/x64", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("libcudart_static.a").is_file())
        .unwrap_or_else(|| fail(&format!("libcudart_static.a not found next to {}", nvcc.display())));
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    println!("cargo:rustc-cfg=cdcl_cuda");
}

/// Where compiled CUDA objects are kept between builds: `CDCL_CUDA_CACHE`, else `cuda-cache` in
/// the outermost cargo target directory above OUT_DIR (the one holding `CACHEDIR.TAG`), so that
/// `--target-dir target/asan` and the release profile share the debug build's objects.
fn cuda_cache_dir(out: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=CDCL_CUDA_CACHE");
    if let Some(dir) = env::var_os("CDCL_CUDA_CACHE") {
        return PathBuf::from(dir);
    }
    let root = out.ancestors().filter(|d| d.join("CACHEDIR.TAG").is_file()).last();
    root.map(|r| r.join("cuda-cache")).unwrap_or_else(|| out.join("cuda-cache"))
}

/// One digest of every file under `kernels/` except the `.cu` translation units themselves
/// (headers any of them may include); a change to any header recompiles every kernel.
fn header_digest(kernels: &Path) -> u64 {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_none_or(|e| e != "cu") {
                files.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(kernels, &mut files);
    files.sort();
    let mut f = Fingerprint::new();
    for p in files {
        f = f
            .bytes(p.strip_prefix(kernels).unwrap_or(&p).to_string_lossy().as_bytes())
            .bytes(&fs::read(&p).unwrap_or_default());
    }
    f.finish()
}

/// FNV-1a over length-prefixed pieces: stable across toolchains, unlike `DefaultHasher`, so a
/// cache entry written by one rustc is found by the next.
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(mut self, data: &[u8]) -> Self {
        for b in (data.len() as u64).to_le_bytes().iter().chain(data) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Compiles `cu` into `obj_dir/<stem>.o` and its nvcc report into `report_dir/<stem>.txt`, or
/// copies both from the cache when an entry with the same key exists.
#[allow(clippy::too_many_arguments)]
fn compile_cached(
    nvcc: &Path,
    kernels: &Path,
    cu: &Path,
    flags: &[String],
    key: u64,
    cache: &Path,
    obj_dir: &Path,
    report_dir: &Path,
) -> Result<(), String> {
    let stem = cu.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel").to_string();
    let obj = obj_dir.join(format!("{stem}.o"));
    let report_path = report_dir.join(format!("{stem}.txt"));
    let entry = cache.join(format!("{stem}-{key:016x}"));
    let (cached_obj, cached_report) = (entry.with_extension("o"), entry.with_extension("txt"));
    if cached_obj.is_file() && cached_report.is_file() {
        let copied = fs::copy(&cached_obj, &obj).and_then(|_| fs::copy(&cached_report, &report_path));
        if copied.is_ok() {
            return Ok(());
        }
    }
    let output = Command::new(nvcc)
        .arg("-c")
        .arg(cu)
        .arg("-o")
        .arg(&obj)
        .arg("-I")
        .arg(kernels)
        .args(flags)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let mut report = String::from_utf8_lossy(&output.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&output.stderr));
    fs::write(&report_path, &report).map_err(|e| format!("write the nvcc report {}: {e}", report_path.display()))?;
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{report}", cu.display()));
    }
    // A failed store only costs the next build a recompile; written under a temporary name and
    // renamed, so a concurrent build never reads half an object.
    if fs::create_dir_all(cache).is_ok() {
        let pid = std::process::id();
        for (src, dst) in [(&report_path, &cached_report), (&obj, &cached_obj)] {
            let tmp = dst.with_extension(format!("tmp{pid}"));
            if fs::copy(src, &tmp).is_err() || fs::rename(&tmp, dst).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
        prune_cache(cache, &stem, &entry);
    }
    Ok(())
}

/// Drops this kernel's older entries once a day old, so an edited kernel does not grow the cache
/// without bound while builds of the previous version (another checkout) may still use it.
fn prune_cache(cache: &Path, stem: &str, keep: &Path) {
    let Ok(rd) = fs::read_dir(cache) else { return };
    let day = std::time::Duration::from_secs(24 * 3600);
    for e in rd.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let same_kernel = name.strip_prefix(stem).and_then(|r| r.strip_prefix('-')).is_some_and(|r| r.len() >= 16);
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > day);
        if same_kernel && old && p.with_extension("") != keep {
            let _ = fs::remove_file(&p);
        }
    }
}
