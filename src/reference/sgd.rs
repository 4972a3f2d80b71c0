//! One step of SGD with momentum and weight decay in f64, as `torch.optim.SGD` defines it with
//! dampening 0 and Nesterov off:
//!
//! ```text
//! d   = g + weight_decay · p
//! buf = d                        (first step: no buffer yet)
//! buf = momentum · buf + d       (later steps)
//! p   = p − lr · buf
//! ```
//!
//! [`sgd_step_frozen`] leaves whole rows alone, as the DSBN rows of datasets absent from a step
//! are: the parameter and its buffer keep their values exactly.

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
    sgd_step_frozen(param, grad, buf, lr, momentum, weight_decay, first_step, 1, &[]);
}

/// Like [`sgd_step`] for the tensor viewed as `[len / row_len, row_len]`, except that the
/// elements of the rows listed in `frozen` are not touched.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step_frozen(
    param: &mut [f64],
    grad: &[f64],
    buf: &mut [f64],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    first_step: bool,
    row_len: usize,
    frozen: &[usize],
) {
    assert!(param.len() == grad.len() && param.len() == buf.len(), "sgd_step: lengths differ");
    assert!(row_len >= 1, "sgd_step: rows need at least one element");
    for i in 0..param.len() {
        if frozen.contains(&(i / row_len)) {
            continue;
        }
        let d = grad[i] + weight_decay * param[i];
        buf[i] = if first_step { d } else { momentum * buf[i] + d };
        param[i] -= lr * buf[i];
    }
}
