//! The `cdcl train` options of semi-supervised training (USSS: an entropy loss on unlabelled
//! images against class prototypes; see `cdcl::train::usss`), flattened into the train
//! arguments.

use std::path::Path;

use cdcl::data::layouts::image_folder;
use cdcl::data::FileDataset;
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
    /// With --data: a folder of unlabelled images (PNG or JPEG) of the dataset named NAME (as
    /// --data names it). Repeat for several datasets; each iteration draws an unlabelled batch
    /// of --batch crops for every dataset it trains that has one.
    #[arg(long = "unlabeled", value_name = "NAME=PATH")]
    pub unlabeled: Vec<String>,
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
        if !self.unlabeled.is_empty() {
            return Err(Error::InvalidArgument(
                "--unlabeled names folders of images for --data; the synthetic scenes hold back labels with \
                 --unlabeled-fraction"
                    .into(),
            ));
        }
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

    /// With `--data`: the unlabelled image folders of `--unlabeled`, each with the index of the
    /// training set it belongs to (`sets`, by name), in the order given. Refuses
    /// `--unlabeled-fraction`, a name that is not one of `sets` or given twice, a folder without
    /// images, and USSS weights without any unlabelled folder.
    pub fn open_unlabeled(&self, sets: &[FileDataset]) -> Result<Vec<(usize, FileDataset)>> {
        if self.unlabeled_fraction.is_some() {
            return Err(Error::InvalidArgument(
                "--unlabeled-fraction holds back labels of the synthetic scenes; with --data give --unlabeled NAME=PATH"
                    .into(),
            ));
        }
        if self.config()?.active() && self.unlabeled.is_empty() {
            return Err(Error::InvalidArgument(
                "--alpha / --beta train on unlabelled images: give --unlabeled NAME=PATH".into(),
            ));
        }
        let mut out: Vec<(usize, FileDataset)> = Vec::new();
        for spec in &self.unlabeled {
            let (name, path) = spec
                .split_once('=')
                .filter(|(n, p)| !n.is_empty() && !p.is_empty())
                .ok_or_else(|| Error::InvalidArgument(format!("--unlabeled {spec:?}: expected NAME=PATH")))?;
            let d = sets.iter().position(|s| s.name == name).ok_or_else(|| {
                let names: Vec<&str> = sets.iter().map(|s| s.name.as_str()).collect();
                Error::InvalidArgument(format!("--unlabeled {spec:?}: no --data dataset is named {name:?} ({names:?})"))
            })?;
            if out.iter().any(|(o, _)| *o == d) {
                return Err(Error::InvalidArgument(format!("--unlabeled names {name:?} twice")));
            }
            out.push((d, image_folder(Path::new(path), &sets[d])?));
        }
        Ok(out)
    }
}
