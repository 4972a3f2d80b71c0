//! One step of SGD with momentum and weight decay in f64, as `torch.optim.SGD` defines it with
//! dampening 0 and Nesterov off:
//!
//! ```text
//! d   = g + weight_decay · p
//! buf = d                        (first step: no buffer yet)
//! buf = momentum · buf + d       (later steps)
//! p   = p − lr · buf
//! ```

/// Updates `param` and `buf` in place for one tensor.
pub fn sgd_step(
    param: &mut [f64],
    grad: &[f64],
    buf: &mut [f64],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    first_step: bool,
) {
    assert!(param.len() == grad.len() && param.len() == buf.len(), "sgd_step: lengths differ");
    for i in 0..param.len() {
        let d = grad[i] + weight_decay * param[i];
        buf[i] = if first_step { d } else { momentum * buf[i] + d };
        param[i] -= lr * buf[i];
    }
}
