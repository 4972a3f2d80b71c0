//! Residual add, ReLU, add + ReLU and the ReLU backward in f64, from their definitions, with
//! PyTorch's NaN behaviour: `relu(NaN) = NaN`; the backward takes its mask from the forward
//! output, `dx = 0 if y <= 0 else dy` (a NaN output passes the gradient, as in
//! `threshold_backward`).

/// `max(v, 0)`, NaN passing through.
pub fn relu_scalar(v: f64) -> f64 {
    if v.is_nan() || v > 0.0 {
        v
    } else {
        0.0
    }
}

/// `a + b`.
pub fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "add: lengths differ");
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `relu(x)`.
pub fn relu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| relu_scalar(v)).collect()
}

/// `relu(a + b)`.
pub fn add_relu(a: &[f64], b: &[f64]) -> Vec<f64> {
    relu(&add(a, b))
}

/// Gradient of a ReLU with output `y` for an output gradient `dy`.
pub fn relu_backward(dy: &[f64], y: &[f64]) -> Vec<f64> {
    assert_eq!(dy.len(), y.len(), "relu_backward: lengths differ");
    dy.iter().zip(y).map(|(&g, &out)| if out.is_nan() || out > 0.0 { g } else { 0.0 }).collect()
}
