//! Facts about the machine code of the GPU build, read with `cuobjdump -sass` from the nvcc
//! objects that build.rs keeps (OUT_DIR/cuda-obj): the f16/bf16 convolution mainloops run on
//! the tensor cores (HMMA instructions) for every compiled architecture, the f32 ones do not,
//! and the channel-aligned fast paths issue vector loads.
//!
//! Needs the nvcc build and cuobjdump, looked up as $CUOBJDUMP, then on PATH, then next to the
//! nvcc the build used. CI installs it with
//! `pip install nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86` (it lands in
//! `site-packages/nvidia/cu13/bin`, next to the wheel's nvcc). Without either the test says so
//! and passes, unless CDCL_REQUIRE_CUOBJDUMP is set (for CI), where a missing build or tool fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cuobjdump() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("CUOBJDUMP") {
        return exe(PathBuf::from(p));
    }
    if let Some(p) =
        std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).find_map(|d| exe(d.join("cuobjdump"))))
    {
        return Some(p);
    }
    option_env!("CDCL_NVCC_BIN_DIR").and_then(|d| exe(Path::new(d).join("cuobjdump")))
}

/// (architecture, function name, SASS text) of every function in a `cuobjdump -sass` listing.
fn functions(listing: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    let mut arch = String::new();
    for line in listing.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("arch = ") {
            arch = rest.trim().to_string();
        } else if let Some(name) = t.strip_prefix("Function : ") {
            out.push((arch.clone(), name.trim().to_string(), String::new()));
        } else if let Some(f) = out.last_mut() {
            f.2.push_str(t);
            f.2.push('\n');
        }
    }
    out
}

#[test]
fn the_16_bit_convolution_mainloop_uses_tensor_cores() {
    let required = std::env::var_os("CDCL_REQUIRE_CUOBJDUMP").is_some();
    let obj = Path::new(env!("CDCL_CUDA_OBJ_DIR")).join("conv.o");
    if !obj.is_file() {
        assert!(!required, "CDCL_REQUIRE_CUOBJDUMP is set but there is no nvcc build ({})", obj.display());
        eprintln!("no nvcc build (nvcc not found or CDCL_NO_CUDA): skipping the SASS check");
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(!required, "CDCL_REQUIRE_CUOBJDUMP is set but cuobjdump was not found (CUOBJDUMP, PATH, next to nvcc)");
        eprintln!("cuobjdump not found (CUOBJDUMP, PATH, next to nvcc): skipping the SASS check (CI runs it)");
        return;
    };
    let out = Command::new(&tool).arg("-sass").arg(&obj).output().expect("run cuobjdump");
    assert!(out.status.success(), "cuobjdump failed: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    let fns = functions(&listing);
    let archs: std::collections::BTreeSet<&str> = fns.iter().map(|f| f.0.as_str()).collect();
    assert!(!archs.is_empty(), "no architecture in the listing:\n{listing}");
    for arch in &archs {
        let of_arch = |pat: &str| {
            fns.iter().filter(|f| f.0 == *arch && f.1.contains(pat)).map(|f| (&f.1, &f.2)).collect::<Vec<_>>()
        };
        let wmma = of_arch("implicit_gemm_wmma");
        // One instantiation per problem (forward, data gradient, filter gradient) and 16-bit type
        // (__half, __nv_bfloat16): the mangled names carry both.
        for problem in ["ConvForward", "ConvBackwardData", "ConvBackwardFilter"] {
            for ty in ["6__half", "13__nv_bfloat16"] {
                let n = wmma.iter().filter(|f| f.0.contains(problem) && f.0.contains(ty)).count();
                assert!(n >= 1, "{arch}: no {problem}<{ty}> tensor-core mainloop in {:?}", wmma.iter().map(|f| f.0));
            }
        }
        assert_eq!(wmma.len(), 6, "{arch}: the tensor-core mainloops: {:?}", wmma.iter().map(|f| f.0));
        for (name, sass) in &wmma {
            let hmma = sass.lines().filter(|l| l.contains("HMMA")).count();
            // Two m16n16k16 MMAs per reduction step: several HMMA instructions each.
            assert!(hmma >= 4, "{arch} {name}: {hmma} HMMA instructions");
        }
        // Every problem's fast path (channel counts multiple of 4) loads four elements with one
        // instruction: 128-bit loads for f32, 64-bit for f16 / bf16.
        for (name, sass) in of_arch("implicit_gemm") {
            let wide = if name.contains("implicit_gemm_wmma") { "LDG.E.64" } else { "LDG.E.128" };
            assert!(sass.contains(wide), "{arch} {name}: no {wide} vector load in the fast path");
        }
        for (name, sass) in of_arch("implicit_gemm").iter().filter(|f| !f.0.contains("implicit_gemm_wmma")) {
            assert!(!sass.contains("HMMA"), "{arch} {name}: the f32 mainloop should not use tensor cores");
            assert!(sass.contains("FFMA"), "{arch} {name}: the f32 mainloop is FFMA");
        }
    }
}

#[test]
fn the_listing_parser_reads_cuobjdump_output() {
    let sample = "Fatbin elf code:\n================\narch = sm_80\ncode version = [1,8]\n\n\tcode for sm_80\n\
                  \t\tFunction : _Z3foo\n\t.headerflags @\"EF_CUDA_SM80\"\n\
                  /*0000*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n";
    let f = functions(sample);
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].0.as_str(), f[0].1.as_str()), ("sm_80", "_Z3foo"));
    assert!(f[0].2.contains("HMMA"));
}

/// Training in bf16 runs on the tensor cores: every convolution instantiation that one bf16 step
/// of `cdcl train` launches (counted per problem and storage type by the device backend, here on
/// the emulator) is one of the HMMA mainloops checked above — and no f32 mainloop runs.
#[test]
fn bf16_training_launches_only_the_hmma_mainloops() {
    use cdcl::backend::{Backend, ConvProblem, DeviceBackend};
    use cdcl::nn::ModelConfig;
    use cdcl::train::{Batch, Precision, TrainConfig, Trainer};

    let be = DeviceBackend::new(cdcl::Device::emulator());
    let model = ModelConfig { width: 1.0 / 16.0, ..ModelConfig::resnet18(vec![3, 2]) };
    let mut t = Trainer::new(&be, model, TrainConfig { precision: Precision::Bf16, ..TrainConfig::default() }).unwrap();
    let batch = |dataset: usize, classes: i32| Batch {
        dataset,
        n: 2,
        h: 16,
        w: 16,
        images: (0..2 * 16 * 16 * 3).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect(),
        labels: (0..2 * 16 * 16).map(|i| i % classes).collect(),
    };
    let before = be.op_counters().unwrap();
    t.step(&[batch(0, 3), batch(1, 2)]).unwrap();
    let kinds = (be.op_counters().unwrap() - before).convolution_kinds();
    let want: Vec<_> = ConvProblem::ALL.iter().map(|&p| (p, cdcl::DType::BF16)).collect();
    assert_eq!(kinds, want, "the convolutions a bf16 step launches");

    let required = std::env::var_os("CDCL_REQUIRE_CUOBJDUMP").is_some();
    let obj = Path::new(env!("CDCL_CUDA_OBJ_DIR")).join("conv.o");
    let Some(tool) = cuobjdump().filter(|_| obj.is_file()) else {
        assert!(!required, "CDCL_REQUIRE_CUOBJDUMP is set but there is no nvcc build or cuobjdump");
        eprintln!("no nvcc build or cuobjdump: the launched instantiations are known, their SASS is not checked");
        return;
    };
    let out = Command::new(&tool).arg("-sass").arg(&obj).output().expect("run cuobjdump");
    let fns = functions(&String::from_utf8_lossy(&out.stdout));
    for (problem, _) in kinds {
        let name = match problem {
            ConvProblem::Forward => "ConvForward",
            ConvProblem::BackwardData => "ConvBackwardData",
            ConvProblem::BackwardFilter => "ConvBackwardFilter",
        };
        let hits: Vec<_> = fns
            .iter()
            .filter(|f| f.1.contains("implicit_gemm_wmma") && f.1.contains(name) && f.1.contains("13__nv_bfloat16"))
            .collect();
        assert!(!hits.is_empty(), "no bf16 {name} tensor-core mainloop in the build");
        for (arch, fname, sass) in hits {
            assert!(sass.contains("HMMA"), "{arch} {fname}: the bf16 {name} mainloop has no HMMA");
        }
    }
}
