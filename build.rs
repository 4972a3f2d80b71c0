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
    build_emulator(&kernels, &cu_files);

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

fn build_emulator(kernels: &Path, cu_files: &[PathBuf]) {
    let mut b = cc::Build::new();
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
        .warnings(true)
        .extra_warnings(true);
    if asan_enabled() {
        b.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        // rustc links with -nodefaultlibs, so gcc's -fsanitize=address would not add the runtime:
        // name it. It is not first in the library list; kernels/emu/emu.cpp's
        // __asan_default_options turns that check off.
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    for f in cu_files {
        b.file(f);
    }
    b.file(kernels.join("emu/selftest.cu"));
    b.file(kernels.join("emu/emu.cpp"));
    b.file(kernels.join("emu/fiber.cpp"));
    b.compile("cdcl_emu");
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
    let mut objects = Vec::new();
    for cu in cu_files {
        let stem = cu.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel").to_string();
        let obj = obj_dir.join(format!("{stem}.o"));
        let mut cmd = Command::new(nvcc);
        cmd.arg("-c").arg(cu).arg("-o").arg(&obj).arg("-std=c++17").arg("-O3").arg("-I").arg(kernels).args([
            "-Xcompiler",
            "-fPIC",
            "-Xptxas",
            "-v",
            "-Xptxas",
            "-warn-spills",
            "-Xptxas",
            "-warn-lmem-usage",
        ]);
        for a in &archs {
            cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
        }
        cmd.arg(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
        let output = cmd.output().unwrap_or_else(|e| fail(&format!("could not run {}: {e}", nvcc.display())));
        let mut report = String::from_utf8_lossy(&output.stdout).into_owned();
        report.push_str(&String::from_utf8_lossy(&output.stderr));
        fs::write(report_dir.join(format!("{stem}.txt")), &report).expect("write the nvcc report");
        if !output.status.success() {
            fail(&format!("nvcc failed on {}:\n{report}", cu.display()));
        }
        objects.push(obj);
    }
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
