//! The parts of the `cdcl` command that deal with real data, evaluation and run bookkeeping:
//! `--data` training (`real`), `cdcl eval` (`eval_cmd`), checkpoints, resume, pretrained
//! weights and logs shared by every training run (`session`, `run_log`, `chart`).

pub mod chart;
pub mod data_args;
pub mod eval_cmd;
pub mod launch;
pub mod modes;
pub mod profile;
pub mod real;
pub mod recalibrate;
pub mod run_log;
pub mod session;
pub mod study;
pub mod usss_args;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::parser::ValueSource;
use indicatif::ProgressStyle;

use cdcl::data::DatasetKind;
use cdcl::nn::Depth;
use cdcl::{Error, Result};

static EXPLICIT: OnceLock<BTreeSet<String>> = OnceLock::new();

/// Records which arguments of the subcommand were given on the command line (rather than
/// left at their defaults): a resumed run takes its model from the checkpoint unless a model
/// flag was given explicitly, and then the two must agree.
pub fn record_explicit(matches: &clap::ArgMatches) {
    let mut set = BTreeSet::new();
    if let Some((_, sub)) = matches.subcommand() {
        for id in sub.ids() {
            if sub.value_source(id.as_str()) == Some(ValueSource::CommandLine) {
                set.insert(id.as_str().to_string());
            }
        }
    }
    let _ = EXPLICIT.set(set);
}

/// Whether argument `id` (its field name) was given on the command line.
pub fn explicit(id: &str) -> bool {
    EXPLICIT.get().is_some_and(|s| s.contains(id))
}

/// A dataset named on the command line: `KIND=PATH` or `KIND:NAME=PATH` (NAME defaults to
/// KIND and is what checkpoints and reports call it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSpec {
    /// Its layout.
    pub kind: DatasetKind,
    /// Its name in the run.
    pub name: String,
    /// Its root folder.
    pub path: PathBuf,
}

impl DataSpec {
    /// Parses `KIND[:NAME]=PATH`.
    pub fn parse(s: &str) -> Result<Self> {
        let (head, path) = s.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!("--data {s:?}: expected NAME=PATH, e.g. cityscapes=/data/cityscapes"))
        })?;
        let (kind, name) = match head.split_once(':') {
            Some((k, n)) if !n.is_empty() => (k, n.to_string()),
            _ => (head, head.to_ascii_lowercase()),
        };
        if path.is_empty() {
            return Err(Error::InvalidArgument(format!("--data {s:?}: the path is empty")));
        }
        Ok(DataSpec { kind: DatasetKind::parse(kind)?, name, path: PathBuf::from(path) })
    }
}

/// The number of a ResNet depth (18, 34, 50, 101).
pub fn depth_number(d: Depth) -> u32 {
    match d {
        Depth::R18 => 18,
        Depth::R34 => 34,
        Depth::R50 => 50,
        Depth::R101 => 101,
    }
}

/// Parses `H×W`, `HxW` or a single size for both.
pub fn parse_size(s: &str, what: &str) -> Result<(usize, usize)> {
    let bad = || Error::InvalidArgument(format!("{what} {s:?}: expected SIZE or HxW with positive sizes"));
    let parts: Vec<&str> = s.split(['x', 'X', '×']).collect();
    let nums: Vec<usize> = parts.iter().map(|p| p.trim().parse::<usize>().map_err(|_| bad())).collect::<Result<_>>()?;
    match nums[..] {
        [n] if n > 0 => Ok((n, n)),
        [h, w] if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(bad()),
    }
}

/// Parses a comma-separated list of positive numbers.
pub fn parse_floats(s: &str, what: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<f32>().ok().filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                Error::InvalidArgument(format!("{what} {s:?}: expected positive numbers separated by commas"))
            })
        })
        .collect()
}

/// The progress bar style of every long loop: bar, count, elapsed < remaining, message.
pub fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_specs_and_sizes_parse() {
        let s = DataSpec::parse("cityscapes=/data/cs").unwrap();
        assert_eq!(
            (s.kind, s.name.as_str(), s.path),
            (DatasetKind::Cityscapes, "cityscapes", PathBuf::from("/data/cs"))
        );
        let s = DataSpec::parse("list:mapillary=/m").unwrap();
        assert_eq!((s.kind, s.name.as_str()), (DatasetKind::List, "mapillary"));
        assert!(DataSpec::parse("cityscapes").is_err());
        assert!(DataSpec::parse("voc=/x").is_err());
        assert_eq!(parse_size("512", "--crop").unwrap(), (512, 512));
        assert_eq!(parse_size("512x1024", "--crop").unwrap(), (512, 1024));
        assert!(parse_size("0x4", "--crop").is_err());
        assert_eq!(parse_floats("0.5,2", "--scale-range").unwrap(), [0.5, 2.0]);
        assert!(parse_floats("0.5,-1", "--scales").is_err());
    }
}
