//! Facts about the machine code of the GPU build, read with `cuobjdump -sass` from the nvcc
//! objects that build.rs keeps (OUT_DIR/cuda-obj): the f16/bf16 convolution mainloops run on
//! the tensor cores (HMMA instructions) for every compiled architecture, and so do the f32 ones
//! in TF32; the exact f32 ones do not, and load shared memory 128 bits at a time; the
//! channel-aligned fast paths issue vector loads.
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
        // One instantiation per problem (forward, data gradient, filter gradient) and storage
        // type (__half, __nv_bfloat16, and f32 in TF32): the mangled names carry both
        // (`...I6__halfEES2_EE...`, `...IfEEfEE...`).
        for problem in ["ConvForward", "ConvBackwardData", "ConvBackwardFilter"] {
            for ty in ["6__half", "13__nv_bfloat16", "IfEEfE"] {
                let n = wmma.iter().filter(|f| f.0.contains(problem) && f.0.contains(ty)).count();
                assert!(n >= 1, "{arch}: no {problem}<{ty}> tensor-core mainloop in {:?}", wmma.iter().map(|f| f.0));
            }
        }
        assert_eq!(wmma.len(), 9, "{arch}: the tensor-core mainloops: {:?}", wmma.iter().map(|f| f.0));
        for (name, sass) in &wmma {
            let hmma = sass.lines().filter(|l| l.contains("HMMA")).count();
            // Two m16n16k16 MMAs per reduction step (four m16n16k8 in TF32): several HMMA
            // instructions each.
            assert!(hmma >= 4, "{arch} {name}: {hmma} HMMA instructions");
            // The f32 instantiations multiply in TF32 (HMMA.1684.F32.TF32: m16n8k4, f32
            // accumulation); the 16-bit ones in f16 / bf16 (HMMA.16816), never TF32.
            let tf32 = sass.lines().filter(|l| l.contains("HMMA") && l.contains(".TF32")).count();
            if name.contains("IfEEfE") {
                assert_eq!(tf32, hmma, "{arch} {name}: {tf32} of {hmma} HMMA in TF32");
                assert!(sass.contains("HMMA.1684.F32.TF32"), "{arch} {name}: no HMMA.1684.F32.TF32");
            } else {
                assert_eq!(tf32, 0, "{arch} {name}: a 16-bit mainloop in TF32");
                assert!(sass.contains("HMMA.16816.F32"), "{arch} {name}: no HMMA.16816.F32");
            }
        }
        // Every problem's fast path (channel counts multiple of 4) loads four elements with one
        // instruction: 128-bit loads for f32 (FFMA or TF32), 64-bit for f16 / bf16.
        for (name, sass) in of_arch("implicit_gemm") {
            let sixteen_bit = name.contains("implicit_gemm_wmma") && !name.contains("IfEEfE");
            let wide = if sixteen_bit { "LDG.E.64" } else { "LDG.E.128" };
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

/// The SASS listing of conv.o as (architecture, function, text) triples, or None (with the
/// reason printed, or a failure under CDCL_REQUIRE_CUOBJDUMP) when there is no nvcc build or
/// no cuobjdump.
fn conv_listing() -> Option<Vec<(String, String, String)>> {
    listing("conv.o")
}

/// The SASS listing of one of the nvcc objects (`conv.o`, `dsbn.o`, ...), as [`conv_listing`].
fn listing(object: &str) -> Option<Vec<(String, String, String)>> {
    let required = std::env::var_os("CDCL_REQUIRE_CUOBJDUMP").is_some();
    let obj = Path::new(env!("CDCL_CUDA_OBJ_DIR")).join(object);
    let Some(tool) = cuobjdump().filter(|_| obj.is_file()) else {
        assert!(!required, "CDCL_REQUIRE_CUOBJDUMP is set but there is no nvcc build or cuobjdump");
        eprintln!("no nvcc build or cuobjdump: skipping the SASS check (CI runs it)");
        return None;
    };
    let out = Command::new(&tool).arg("-sass").arg(&obj).output().expect("run cuobjdump");
    assert!(out.status.success(), "cuobjdump failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(functions(&String::from_utf8_lossy(&out.stdout)))
}

/// The instructions of one function's SASS: (address, text without the trailing `;`).
fn instructions(sass: &str) -> Vec<(u64, String)> {
    sass.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("/*")?;
            let (addr, text) = rest.split_once("*/")?;
            let addr = u64::from_str_radix(addr.trim(), 16).ok()?;
            let text = text.split(';').next()?.trim();
            (!text.is_empty()).then(|| (addr, text.to_string()))
        })
        .collect()
}

/// The outermost loops of a function that contain an instruction satisfying `key`: each the
/// instructions from a backward branch's target to the branch. Loops nested in another such
/// loop are part of it.
fn loops_with(ins: &[(u64, String)], key: impl Fn(&str) -> bool) -> Vec<&[(u64, String)]> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (i, (addr, text)) in ins.iter().enumerate() {
        if !text.split_whitespace().any(|w| w == "BRA" || w.starts_with("BRA.")) {
            continue;
        }
        let Some(target) = text.rsplit("0x").next() else { continue };
        let Ok(target) = u64::from_str_radix(target.trim(), 16) else { continue };
        if target <= *addr {
            if let Some(start) = ins.iter().position(|(a, _)| *a == target) {
                if ins[start..=i].iter().any(|(_, t)| key(t)) {
                    ranges.push((start, i));
                }
            }
        }
    }
    let outer: Vec<(usize, usize)> = ranges
        .iter()
        .copied()
        .filter(|&(s, e)| !ranges.iter().any(|&(s2, e2)| (s2, e2) != (s, e) && s2 <= s && e <= e2))
        .collect();
    outer.into_iter().map(|(s, e)| &ins[s..=e]).collect()
}

fn count(body: &[(u64, String)], pat: &str) -> usize {
    body.iter().filter(|(_, t)| t.contains(pat)).count()
}

/// The calls in `body` to a subroutine of the function `ins`: a division routine (or any other)
/// is placed after the function's last EXIT. On sm_80-sm_89 nvcc also writes loop exits as a
/// predicated `CALL.REL.NOINC` to the block right after the loop, which is not a call.
fn subroutine_calls(ins: &[(u64, String)], body: &[(u64, String)]) -> usize {
    let last_exit = ins.iter().filter(|(_, t)| t.contains("EXIT")).map(|(a, _)| *a).max().unwrap_or(u64::MAX);
    body.iter()
        .filter_map(|(_, t)| t.split_once("CALL").map(|(_, rest)| rest))
        .filter(|rest| {
            let target = rest.rsplit("0x").next().and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
            target.is_none_or(|a| a > last_exit)
        })
        .count()
}

/// The k-loops of a convolution mainloop: the outermost loops holding its MMAs (HMMA for the
/// tensor-core mainloops, at least 64 FFMA — one step's 4x4 outer products — for the f32 one).
/// There is one per path (vector or general loads, prologue or not).
fn k_loops(sass: &str) -> Vec<Vec<(u64, String)>> {
    let ins = instructions(sass);
    let hmma = count(&ins, "HMMA") > 0;
    loops_with(&ins, |t| t.contains(if hmma { "HMMA" } else { "FFMA" }))
        .into_iter()
        .filter(|body| hmma || count(body, "FFMA") >= 64)
        .map(|b| b.to_vec())
        .collect()
}

/// No convolution k-loop divides: the reduction index advances incrementally and the rows are
/// decomposed before the loop, so there is no subroutine call (the 64-bit division routine), no reciprocal
/// (MUFU.RCP, the heart of the inlined 32-bit division and of float division) and no integer to
/// float conversion (I2F, the 32-bit division's first step) inside any k-loop, for every problem,
/// storage type, path and architecture.
#[test]
fn convolution_k_loops_do_not_divide() {
    let Some(fns) = conv_listing() else { return };
    let mut checked = 0;
    for (arch, name, sass) in fns.iter().filter(|f| f.1.contains("implicit_gemm")) {
        let loops = k_loops(sass);
        // Forward and filter gradient: 4 paths (vector or not, prologue or not); data gradient 2.
        let want = if name.contains("ConvBackwardData") { 2 } else { 4 };
        assert_eq!(loops.len(), want, "{arch} {name}: k-loops found");
        let ins = instructions(sass);
        for body in &loops {
            assert_eq!(
                subroutine_calls(&ins, body),
                0,
                "{arch} {name}: a call in a k-loop of {} instructions",
                body.len()
            );
            for bad in ["MUFU.RCP", "I2F"] {
                assert_eq!(count(body, bad), 0, "{arch} {name}: {bad} in a k-loop of {} instructions", body.len());
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no convolution mainloop in the listing");
}

/// The 16-bit forward k-loop's static instructions per HMMA. Before the iterators (rows
/// decomposed per element with 64-bit divisions, the prologue's tables read from global memory
/// per element, one loop for every path) the sm_90 f16 loop held 1376 instructions for 4 HMMA:
/// 344 per HMMA. Every path's loop must now stay within a quarter of that, on every architecture.
#[test]
fn the_16_bit_forward_k_loop_costs_a_quarter_of_what_it_did() {
    const BEFORE_PER_HMMA: f64 = 1376.0 / 4.0;
    let Some(fns) = conv_listing() else { return };
    let mut checked = 0;
    for (arch, name, sass) in fns
        .iter()
        .filter(|f| f.1.contains("implicit_gemm_wmma") && f.1.contains("ConvForward") && !f.1.contains("IfEEfE"))
    {
        let loops = k_loops(sass);
        for body in &loops {
            let hmma = count(body, "HMMA");
            let per = body.len() as f64 / hmma as f64;
            println!("{arch} {name}: {} instructions, {hmma} HMMA: {per:.1} per HMMA", body.len());
            assert!(per <= BEFORE_PER_HMMA / 4.0, "{arch} {name}: {per:.1} instructions per HMMA");
            checked += 1;
        }
    }
    assert!(checked > 0, "no 16-bit forward mainloop in the listing");
}

/// The f32 FFMA k-loops (TF32 off) read their operands with 128-bit shared loads: each thread's
/// 4x4 micro-tile is 4 contiguous rows by 4 contiguous columns, so one k of the step is one
/// LDS.128 of A and one of B for 16 FFMA. Before (columns 16 apart) every k took 8 LDS.32: one
/// shared load per two FFMA. Checked for every problem, path and architecture: no 32-bit LDS in
/// the loop, and at least one LDS.128 per 8 FFMA.
#[test]
fn the_f32_ffma_k_loop_loads_shared_memory_128_bits_at_a_time() {
    let Some(fns) = conv_listing() else { return };
    let mut checked = 0;
    for (arch, name, sass) in
        fns.iter().filter(|f| f.1.contains("implicit_gemm") && !f.1.contains("implicit_gemm_wmma"))
    {
        for body in k_loops(sass) {
            let (ffma, wide) = (count(&body, "FFMA"), count(&body, "LDS.128"));
            let narrow = body.iter().filter(|(_, t)| t.starts_with("LDS ") || t.contains(" LDS ")).count();
            println!("{arch} {name}: {} instructions, {ffma} FFMA, {wide} LDS.128", body.len());
            assert_eq!(narrow, 0, "{arch} {name}: 32-bit shared loads in the FFMA k-loop");
            assert!(wide * 8 >= ffma, "{arch} {name}: {wide} LDS.128 for {ffma} FFMA");
            checked += 1;
        }
    }
    assert!(checked > 0, "no f32 FFMA mainloop in the listing");
}

#[test]
fn the_loop_finder_reads_branches() {
    let sass = "/*0000*/ MOV R1, R2 ;\n/*0010*/ HMMA.16816.F32 R4, R8, R12, R4 ;\n/*0020*/ IADD3 R1, R1, 0x1, RZ ;\n\
                /*0030*/ @P0 BRA 0x10 ;\n/*0040*/ EXIT ;\n";
    let ins = instructions(sass);
    assert_eq!(ins.len(), 5);
    let loops = loops_with(&ins, |t| t.contains("HMMA"));
    assert_eq!(loops.len(), 1);
    assert_eq!(loops[0].len(), 3, "from the branch target (0x10) to the branch (0x30)");
    assert!(loops_with(&ins, |t| t.contains("CALL")).is_empty());
}

/// The elementwise passes (DSBN apply, infer and backward dx; dropout's apply; max pooling
/// forward and backward) tile each sample's pixels, so a thread's dataset, channel and table
/// entries (or mask value) are fixed and a pixel's row and column come from fast divisors: no call (the 64-bit division routine was
/// called twice per element before) and no 64-bit division anywhere, and no division of any kind
/// (I2F starts the inlined 32-bit one, MUFU.RCP is its reciprocal) in their per-element loops.
#[test]
fn elementwise_passes_do_not_divide() {
    for (object, kernels, per_arch) in [
        ("dsbn.o", &["dsbn_apply", "dsbn_infer", "dsbn_backward_dx"][..], 9),
        ("dropout.o", &["dropout_apply"][..], 3),
        ("maxpool.o", &["maxpool_forward_kernel", "maxpool_backward_kernel"][..], 6),
    ] {
        let Some(fns) = listing(object) else { return };
        let archs: std::collections::BTreeSet<&str> = fns.iter().map(|f| f.0.as_str()).collect();
        let mut checked = 0;
        for (arch, name, sass) in fns.iter().filter(|f| kernels.iter().any(|k| f.1.contains(k))) {
            let ins = instructions(sass);
            assert_eq!(subroutine_calls(&ins, &ins), 0, "{arch} {name}: a call");
            assert_eq!(count(&ins, "I2F.U64"), 0, "{arch} {name}: a 64-bit division");
            let loops = loops_with(&ins, |t| t.starts_with("STG") || t.contains(" STG"));
            assert!(!loops.is_empty(), "{arch} {name}: no per-element loop found");
            for body in loops {
                for bad in ["I2F", "MUFU.RCP"] {
                    assert_eq!(count(body, bad), 0, "{arch} {name}: {bad} in a per-element loop");
                }
            }
            checked += 1;
        }
        // Every pass in every storage type, on every architecture.
        assert_eq!(checked, per_arch * archs.len(), "{object}: the elementwise passes in the listing");
    }
}
