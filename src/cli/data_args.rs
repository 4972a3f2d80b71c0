//! The `cdcl train` options for real data, pretrained weights, periodic checkpoints and logs
//! (flattened into the train arguments).

use std::path::PathBuf;

use cdcl::{Error, Result};

/// Real-data training and run bookkeeping.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Train on a dataset on disk instead of the synthetic scenes: KIND=PATH with KIND one of
    /// cityscapes, bdd100k, camvid, kitti, list (or KIND:NAME=PATH to name it). Repeat for
    /// several datasets; their order is the dataset (head and BN slice) order.
    #[arg(long = "data", value_name = "KIND=PATH")]
    pub data: Vec<String>,
    /// Training crop with --data: SIZE or HxW.
    #[arg(long, default_value = "512")]
    pub crop: String,
    /// Random scale range of the augmentation with --data: LO,HI.
    #[arg(long, default_value = "0.5,2.0")]
    pub scale_range: String,
    /// Threads decoding and augmenting images with --data (0: on the training thread).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Split trained on with --data.
    #[arg(long, default_value = "train")]
    pub train_split: String,
    /// Split evaluated at the end with --data.
    #[arg(long, default_value = "val")]
    pub val_split: String,
    /// Start from an ImageNet-pretrained backbone: a safetensors file in torchvision's ResNet
    /// state_dict names (see the README for the conversion).
    #[arg(long, value_name = "FILE.safetensors")]
    pub pretrained: Option<PathBuf>,
    /// Also write the checkpoint every N iterations (atomically; 0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Write the run's metrics (metrics.jsonl) and a chart of the loss curves (loss.svg) here.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

impl DataArgs {
    /// Options that only mean something with `--data` are refused without it.
    pub fn reject_real_only(&self) -> Result<()> {
        for flag in ["crop", "scale_range", "workers", "train_split", "val_split"] {
            if super::explicit(flag) {
                return Err(Error::InvalidArgument(format!(
                    "--{} applies to real data (--data); the synthetic run uses --size",
                    flag.replace('_', "-")
                )));
            }
        }
        Ok(())
    }
}
