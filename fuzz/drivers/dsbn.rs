//! The DSBN fuzz driver, shared by the cargo-fuzz target and the corpus test.

use arbitrary::{Arbitrary, Unstructured};
use cdcl::ops::dsbn::{self, DsbnOptions, DsbnSaved, DsbnState};
use cdcl::{DType, Device, EmulatorConfig, Tensor};
use std::sync::OnceLock;

#[derive(Arbitrary, Debug)]
enum Op {
    Train,
    Infer,
    BackwardTrain,
    BackwardInfer,
}

/// Decoded so that most inputs make a well-formed call and the `breaks` bits each spoil one
/// aspect of it: random bytes then reach the kernels as well as every validation path.
#[derive(Arbitrary, Debug)]
struct Input {
    op: Op,
    dims: [u8; 4],
    breaks: u8,
    odd_rank: Vec<u8>,
    dtype: u8,
    other_dtype: u8,
    num_datasets: u8,
    other_channels: u8,
    extra_samples: i8,
    datasets: Vec<i32>,
    values: Vec<f32>,
    eps: f32,
    momentum: f32,
    default_options: bool,
    relu: bool,
}

impl Input {
    /// One aspect is broken only when the low two bits are clear (a quarter of the inputs).
    fn broken(&self, bit: u8) -> bool {
        self.breaks & 3 == 0 && self.breaks & (1 << bit) != 0
    }
}

const DTYPES: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::U8];
/// Keeps one call small enough that the fuzzer explores instead of waiting.
const MAX_DIM: usize = 17;
const MAX_ELEMS: usize = 1 << 15;

fn device() -> &'static Device {
    static DEV: OnceLock<Device> = OnceLock::new();
    DEV.get_or_init(|| Device::emulator_with(EmulatorConfig { seed: 1, threads: 1 }).expect("emulator"))
}

fn filled(dev: &Device, shape: &[usize], dtype: DType, values: &[f32]) -> Option<Tensor> {
    let n: usize = shape.iter().product();
    let v = |i: usize| if values.is_empty() { 0.0 } else { values[i % values.len()] };
    let t = match dtype {
        DType::F32 => Tensor::from_slice(dev, shape, &(0..n).map(v).collect::<Vec<_>>()),
        DType::F16 => Tensor::from_slice(dev, shape, &(0..n).map(|i| half::f16::from_f32(v(i))).collect::<Vec<_>>()),
        DType::BF16 => Tensor::from_slice(dev, shape, &(0..n).map(|i| half::bf16::from_f32(v(i))).collect::<Vec<_>>()),
        DType::I32 => Tensor::from_slice(dev, shape, &(0..n).map(|i| v(i) as i32).collect::<Vec<_>>()),
        DType::U8 => Tensor::from_slice(dev, shape, &(0..n).map(|i| v(i) as u8).collect::<Vec<_>>()),
    };
    t.ok()
}

/// What one input did: it could not be decoded into a call, the call succeeded, or it
/// returned a typed error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(dead_code)]
pub enum Outcome {
    Skipped,
    Ok,
    Err,
}

/// Runs one arbitrary DSBN call. Panics only on a bug: an `Ok` whose outputs have the wrong
/// shape, or a panic inside the crate.
pub fn run(data: &[u8]) -> Outcome {
    let Ok(inp) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return Outcome::Skipped };
    let dev = device();
    let shape: Vec<usize> = if inp.broken(2) {
        inp.odd_rank.iter().take(5).map(|&d| d as usize % (MAX_DIM + 1)).collect()
    } else {
        inp.dims.iter().map(|&d| d as usize % MAX_DIM + usize::from(!inp.broken(3))).collect()
    };
    if shape.iter().product::<usize>() > MAX_ELEMS {
        return Outcome::Skipped;
    }
    let dtype = DTYPES[inp.dtype as usize % if inp.broken(4) { 5 } else { 3 }];
    let Some(x) = filled(dev, &shape, dtype, &inp.values) else { return Outcome::Skipped };
    let n = shape.first().copied().unwrap_or(0);
    let num_datasets = inp.num_datasets as usize % 5 + usize::from(!inp.broken(5));
    let ds_len = if inp.broken(6) { (n as isize + inp.extra_samples as isize % 3).clamp(0, 64) as usize } else { n };
    let ds_values: Vec<f32> = inp
        .datasets
        .iter()
        .map(|&d| if inp.broken(7) { d as f32 } else { d.rem_euclid(num_datasets.max(1) as i32) as f32 })
        .collect();
    let ds_dtype = if inp.broken(4) { DTYPES[inp.other_dtype as usize % DTYPES.len()] } else { DType::I32 };
    let Some(datasets) = filled(dev, &[ds_len], ds_dtype, &ds_values) else { return Outcome::Skipped };
    let c = shape.last().copied().unwrap_or(1);
    let state_c = if inp.broken(5) { inp.other_channels as usize % 80 } else { c };
    let Ok(mut state) = DsbnState::new(dev, num_datasets, state_c) else { return Outcome::Err };
    let opts = if inp.default_options {
        DsbnOptions { relu: inp.relu, ..DsbnOptions::default() }
    } else {
        DsbnOptions { eps: inp.eps, momentum: inp.momentum, relu: inp.relu }
    };
    let dy_dtype = if inp.broken(6) { DTYPES[inp.other_dtype as usize % 3] } else { dtype };
    let reversed: Vec<f32> = inp.values.iter().rev().copied().collect();
    let Some(dy) = filled(dev, &shape, dy_dtype, &reversed) else { return Outcome::Skipped };
    let table = [state.num_datasets(), state.channels()];
    let same_shape = |t: &Tensor, s: &[usize]| assert_eq!(t.shape(), s, "an Ok result with a wrong shape");
    let outcome = |ok: bool| if ok { Outcome::Ok } else { Outcome::Err };
    match inp.op {
        Op::Train => match dsbn::forward_train(&x, &datasets, &mut state, &opts) {
            Ok((y, saved)) => {
                same_shape(&y, &shape);
                same_shape(&saved.mean, &table);
                outcome(true)
            }
            Err(_) => outcome(false),
        },
        Op::Infer => match dsbn::forward_infer(&x, &datasets, &state, &opts) {
            Ok(y) => {
                same_shape(&y, &shape);
                outcome(true)
            }
            Err(_) => outcome(false),
        },
        Op::BackwardTrain => {
            let saved = match dsbn::forward_train(&x, &datasets, &mut state, &opts) {
                Ok((_, saved)) => saved,
                Err(_) => {
                    let Ok(mean) = Tensor::zeros(dev, &table, DType::F32) else { return Outcome::Skipped };
                    let Ok(invstd) = Tensor::zeros(dev, &table, DType::F32) else { return Outcome::Skipped };
                    DsbnSaved { mean, invstd }
                }
            };
            match dsbn::backward_train(&dy, &x, &datasets, &state, &saved, &opts) {
                Ok(g) => {
                    same_shape(&g.dx, &shape);
                    same_shape(&g.dgamma, &table);
                    outcome(true)
                }
                Err(_) => outcome(false),
            }
        }
        Op::BackwardInfer => match dsbn::backward_infer(&dy, &x, &datasets, &state, &opts) {
            Ok(g) => {
                same_shape(&g.dx, &shape);
                same_shape(&g.dbeta, &table);
                outcome(true)
            }
            Err(_) => outcome(false),
        },
    }
}
