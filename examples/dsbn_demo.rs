//! A mixed-dataset DSBN forward and backward on the best available device.
//!
//! A batch of 6 samples from three datasets (Cityscapes-, BDD100K- and CamVid-like, each with
//! its own input statistics) goes through one DSBN layer in one launch sequence; the example
//! prints what each dataset's statistics became and checks the result against the CPU
//! reference.
//!
//! Run: `cargo run --release --example dsbn_demo`

use cdcl::ops::dsbn::{self, DsbnOptions, DsbnState};
use cdcl::reference::dsbn as refd;
use cdcl::{Device, Tensor};
use ndarray::{Array2, Array4};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::best_available();
    println!("device: {}", device.name());

    let (n, h, w, c, d) = (6usize, 24usize, 32usize, 16usize, 3usize);
    let datasets = [0usize, 1, 2, 0, 1, 0]; // dataset 0 has three samples, 2 has one
    let names = ["cityscapes", "bdd100k", "camvid"];
    // Each dataset's pixels have their own mean and spread: what DSBN exists for.
    let (means, spreads) = ([0.5f32, -1.0, 2.0], [1.0f32, 0.5, 2.0]);
    let mut seed = 42u64;
    let mut noise = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let x_host = Array4::from_shape_fn((n, h, w, c), |(s, _, _, ch)| {
        let k = datasets[s];
        means[k] + spreads[k] * noise() * 1.7 + 0.01 * ch as f32
    });
    let dy_host = Array4::from_shape_fn((n, h, w, c), |_| noise());

    let x = Tensor::from_array(&device, x_host.view())?;
    let dy = Tensor::from_array(&device, dy_host.view())?;
    let ds: Vec<i32> = datasets.iter().map(|&k| k as i32).collect();
    let ds = Tensor::from_slice(&device, &[n], &ds)?;
    let mut state = DsbnState::new(&device, d, c)?;
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };

    let (y, saved) = dsbn::forward_train(&x, &ds, &mut state, &opts)?;
    let grads = dsbn::backward_train(&dy, &x, &ds, &state, &saved, &opts)?;
    println!("forward_train + backward_train on {:?} with datasets {datasets:?}", x.shape());

    let mean = saved.mean.to_array::<f32>()?;
    let invstd = saved.invstd.to_array::<f32>()?;
    let rmean = state.running_mean.to_array::<f32>()?;
    let dbeta = grads.dbeta.to_array::<f32>()?;
    for (k, name) in names.iter().enumerate() {
        println!(
            "  dataset {k} ({name:>10}): {} sample(s), batch mean[c0] {:+.4}, std[c0] {:.4}, running mean[c0] {:+.4}, dbeta[c0] {:+.4}",
            datasets.iter().filter(|&&s| s == k).count(),
            mean[[k, 0]],
            1.0 / invstd[[k, 0]],
            rmean[[k, 0]],
            dbeta[[k, 0]],
        );
    }

    // The same computation by the f64 reference.
    let to64 = |a: &Array4<f32>| a.mapv(f64::from);
    let (ones, zeros) = (Array2::<f64>::ones((d, c)), Array2::<f64>::zeros((d, c)));
    let cfg = refd::DsbnConfig { relu: true, ..refd::DsbnConfig::default() };
    let want = refd::dsbn_forward_train(
        to64(&x_host).view(),
        &datasets,
        ones.view(),
        zeros.view(),
        zeros.view(),
        ones.view(),
        &cfg,
    )?;
    let want_g = refd::dsbn_backward_train(
        to64(&dy_host).view(),
        to64(&x_host).view(),
        &datasets,
        ones.view(),
        zeros.view(),
        &cfg,
    )?;
    let max_diff = |got: &ndarray::ArrayD<f32>, want: &[f64]| {
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
    };
    let dy_err = max_diff(&y.to_array::<f32>()?, want.y.as_slice().unwrap());
    let dx_err = max_diff(&grads.dx.to_array::<f32>()?, want_g.dx.as_slice().unwrap());
    println!("max |y - reference| = {dy_err:.2e}, max |dx - reference| = {dx_err:.2e}");
    if dy_err > 1e-3 || dx_err > 1e-3 {
        return Err("the device result disagrees with the CPU reference".into());
    }
    Ok(())
}
