//! The `cdcl train` options of semi-supervised training (USSS: an entropy loss on unlabelled
//! images against class prototypes; see `cdcl::train::usss`), flattened into the train
//! arguments.

use cdcl::train::UsssConfig;
use cdcl::{Error, Result};

/// USSS weights and where the unlabelled images come from.
#[derive(clap::Args, Debug, Clone)]
pub struct UsssArgs {
    /// USSS: weight α of the cross-dataset entropy of unlabelled pixels (with --beta 0 too:
    /// no USSS term).
    #[arg(long, default_value_t = 0.0)]
    pub alpha: f32,
    /// USSS: weight β of the within-dataset entropy of unlabelled pixels.
    #[arg(long, default_value_t = 0.0)]
    pub beta: f32,
    /// USSS: softmax temperature of the pixel-to-prototype similarities.
    #[arg(long, default_value_t = 1.0)]
    pub usss_temperature: f32,
    /// USSS: momentum of the class prototypes' moving average, in [0, 1).
    #[arg(long, default_value_t = 0.9)]
    pub prototype_momentum: f32,
    /// Synthetic scenes: hold back the labels of this fraction of each dataset's images of an
    /// iteration (of --batch); those images are the unlabelled batch. With --alpha and --beta 0
    /// they are not used at all (a supervised run on the labelled part).
    #[arg(long, value_name = "FRACTION")]
    pub unlabeled_fraction: Option<f32>,
}

impl UsssArgs {
    /// The trainer's USSS settings, checked.
    pub fn config(&self) -> Result<UsssConfig> {
        let c = UsssConfig {
            alpha: self.alpha,
            beta: self.beta,
            temperature: self.usss_temperature,
            prototype_momentum: self.prototype_momentum,
        };
        c.check()?;
        Ok(c)
    }

    /// Labelled and unlabelled images per dataset and iteration out of `batch` on the synthetic
    /// scenes: `(batch, 0)` without `--unlabeled-fraction`; an error where USSS has no
    /// unlabelled images or one of the two parts would be empty.
    pub fn synthetic_split(&self, batch: usize) -> Result<(usize, usize)> {
        let active = self.config()?.active();
        let Some(f) = self.unlabeled_fraction else {
            if active {
                return Err(Error::InvalidArgument(
                    "--alpha / --beta train on unlabelled images: give --unlabeled-fraction".into(),
                ));
            }
            return Ok((batch, 0));
        };
        if !(f.is_finite() && f > 0.0 && f < 1.0) {
            return Err(Error::InvalidArgument(format!("--unlabeled-fraction must be in (0, 1), got {f}")));
        }
        let unlabeled = (f64::from(f) * batch as f64).round() as usize;
        if unlabeled == 0 || unlabeled >= batch {
            return Err(Error::InvalidArgument(format!(
                "--unlabeled-fraction {f} of --batch {batch} leaves {} labelled and {unlabeled} unlabelled images: \
                 both need at least one",
                batch.saturating_sub(unlabeled)
            )));
        }
        Ok((batch - unlabeled, unlabeled))
    }

    /// Options that only mean something on the synthetic scenes are refused with `--data`.
    pub fn reject_synthetic_only(&self) -> Result<()> {
        if self.unlabeled_fraction.is_some() {
            return Err(Error::InvalidArgument(
                "--unlabeled-fraction holds back labels of the synthetic scenes; it does not apply with --data".into(),
            ));
        }
        if self.config()?.active() {
            return Err(Error::InvalidArgument(
                "USSS training (--alpha / --beta) runs on the synthetic scenes (--unlabeled-fraction) for now".into(),
            ));
        }
        Ok(())
    }
}
