//! Mixed precision: the storage type of a step's activations, and dynamic loss scaling for f16.
//!
//! - **f32**: everything in f32.
//! - **bf16**: activations and their gradients in bf16, convolution weights as bf16 copies of
//!   f32 masters (the tensor-core mainloops), f32 statistics, DSBN tables, losses, accumulation
//!   and optimiser state. bf16 has f32's exponent range, so no loss scaling.
//! - **f16**: as bf16 with f16 storage, plus dynamic loss scaling (PyTorch's `GradScaler`
//!   rules): the loss gradient is multiplied by the scale so that small gradients do not flush to
//!   zero in f16; the parameter gradients are divided by it when they are gathered; when any of
//!   them is infinite or NaN the step is skipped (on the device: no weight, buffer or copy is
//!   written) and the scale shrinks by `backoff`; after `growth_interval` good steps in a row it
//!   grows by `growth_factor`.

use crate::error::{Error, Result};
use crate::tensor::DType;

/// The storage type of a training step's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// bf16 activations and convolution weights, f32 masters, statistics and loss.
    Bf16,
    /// f16 activations and convolution weights with dynamic loss scaling.
    F16,
}

impl Precision {
    /// The activations' storage type.
    pub fn storage(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// "f32", "bf16" or "f16" (what [`Precision::parse`] reads).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// "f32", "bf16" or "f16".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" | "fp16" => Ok(Precision::F16),
            _ => Err(Error::InvalidArgument(format!("unknown precision {s:?}: use f32, bf16 or f16"))),
        }
    }

    /// Whether the step scales its loss (f16 only).
    pub fn scales_loss(self) -> bool {
        self == Precision::F16
    }
}

/// Dynamic loss scaling settings (PyTorch's `GradScaler` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleConfig {
    /// The scale of the first step (2¹⁶).
    pub init: f32,
    /// Multiplier after `growth_interval` steps in a row without overflow (2).
    pub growth_factor: f32,
    /// Multiplier after an overflow (0.5).
    pub backoff: f32,
    /// Good steps in a row before the scale grows (2000).
    pub growth_interval: usize,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig { init: 65536.0, growth_factor: 2.0, backoff: 0.5, growth_interval: 2000 }
    }
}

impl LossScaleConfig {
    pub(crate) fn check(&self) -> Result<()> {
        let ok = self.init.is_finite()
            && self.init > 0.0
            && self.growth_factor.is_finite()
            && self.growth_factor >= 1.0
            && self.backoff > 0.0
            && self.backoff < 1.0
            && self.growth_interval > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!("bad loss-scale settings {self:?}")))
        }
    }
}

/// The state of dynamic loss scaling between steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    config: LossScaleConfig,
    scale: f32,
    good_steps: usize,
}

impl LossScaler {
    /// A scaler starting at `config.init`.
    pub fn new(config: LossScaleConfig) -> Self {
        LossScaler { config, scale: config.init, good_steps: 0 }
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Good steps in a row since the last overflow or growth.
    pub fn good_steps(&self) -> usize {
        self.good_steps
    }

    /// A scaler resumed at `scale` after `good_steps` good steps (a checkpoint's state); `None`
    /// when the scale is not a finite positive number.
    pub fn resumed(config: LossScaleConfig, scale: f32, good_steps: usize) -> Option<Self> {
        (scale.is_finite() && scale > 0.0).then_some(LossScaler { config, scale, good_steps })
    }

    /// Applies the rules after a step: shrink on overflow (and start counting again), grow after
    /// a run of good steps. The scale stays a finite positive f32.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale = (self.scale * self.config.backoff).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.config.growth_interval {
                let grown = self.scale * self.config.growth_factor;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_on_overflow_and_grows_after_a_run() {
        let cfg = LossScaleConfig { init: 1024.0, growth_interval: 3, ..LossScaleConfig::default() };
        let mut s = LossScaler::new(cfg);
        s.update(true);
        assert_eq!(s.scale(), 512.0);
        s.update(false);
        s.update(false);
        assert_eq!(s.scale(), 512.0);
        s.update(true); // an overflow resets the run
        s.update(false);
        s.update(false);
        assert_eq!(s.scale(), 256.0);
        s.update(false);
        assert_eq!(s.scale(), 512.0);
        let mut huge = LossScaler::new(LossScaleConfig { init: f32::MAX, growth_interval: 1, ..cfg });
        huge.update(false);
        assert_eq!(huge.scale(), f32::MAX, "growth that would overflow f32 is not taken");
    }

    #[test]
    fn parses_the_command_line_names() {
        assert_eq!(Precision::parse("bf16").unwrap().storage(), DType::BF16);
        assert_eq!(Precision::parse("f16").unwrap().storage(), DType::F16);
        assert_eq!(Precision::parse("f32").unwrap(), Precision::F32);
        assert!(Precision::parse("int8").is_err());
    }
}
