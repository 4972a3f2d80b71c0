//! One shuffled sampler per dataset.
//!
//! DAT draws a batch of every dataset each iteration, and datasets differ in length, so each
//! dataset has its own endless stream of sample indices: epoch `e` of dataset `d` is a
//! permutation of `0..len` that is a pure function of `(seed, d, e)` (Fisher–Yates over a
//! counter-based generator), and the stream runs through epoch 0, then 1, … without dropping
//! or repeating anything (a batch may straddle two epochs, as with mmsegmentation's infinite
//! sampler). Batch `k` of the dataset is positions `k·B·world .. (k+1)·B·world` of the stream,
//! of which rank `r` takes the `r`-th run of `B`: the ranks' shards are disjoint and together
//! they are exactly the single-process batch of size `B·world`. Everything is a function of
//! `k`, so a resumed run draws what the uninterrupted one would have.

use super::rng::{derive, splitmix64};
use crate::error::{Error, Result};

const SHUFFLE_STREAM: u64 = 0x5348_5546_464C_4521; // "SHUFFLE!"

/// Which sample, seen in which epoch of its dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    /// Dataset index (its place in the run's list of datasets).
    pub dataset: usize,
    /// Epoch of that dataset.
    pub epoch: u64,
    /// Sample index within the split.
    pub index: usize,
}

/// Epoch `epoch`'s order of the `len` samples of dataset `dataset`.
pub fn epoch_permutation(seed: u64, dataset: usize, epoch: u64, len: usize) -> Vec<usize> {
    let key = derive(seed, &[SHUFFLE_STREAM, dataset as u64, epoch]);
    let mut p: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = ((splitmix64(key, i as u64) as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

/// The endless, sharded stream of one dataset's samples.
#[derive(Debug, Clone)]
pub struct Sampler {
    dataset: usize,
    len: usize,
    seed: u64,
    batch: usize,
    rank: usize,
    world: usize,
    shuffle: bool,
    /// The last two epochs' permutations (a batch touches at most two unless it is longer
    /// than the dataset).
    cache: Vec<(u64, Vec<usize>)>,
}

impl Sampler {
    /// A sampler of dataset `dataset` (`len` samples) giving `batch` samples per batch to
    /// rank `rank` of `world`; `shuffle = false` keeps the split's order in every epoch.
    pub fn new(
        dataset: usize,
        len: usize,
        seed: u64,
        batch: usize,
        rank: usize,
        world: usize,
        shuffle: bool,
    ) -> Result<Self> {
        if len == 0 || batch == 0 || world == 0 || rank >= world {
            return Err(Error::InvalidArgument(format!(
                "sampler of dataset {dataset}: needs samples ({len}), a batch ({batch}) and rank {rank} < world {world}"
            )));
        }
        Ok(Sampler { dataset, len, seed, batch, rank, world, shuffle, cache: Vec::new() })
    }

    /// Samples per batch on this rank.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The sample at position `p` of the dataset's stream.
    pub fn at(&mut self, p: u64) -> SampleRef {
        let epoch = p / self.len as u64;
        let i = (p % self.len as u64) as usize;
        let index = if self.shuffle { self.permutation(epoch)[i] } else { i };
        SampleRef { dataset: self.dataset, epoch, index }
    }

    fn permutation(&mut self, epoch: u64) -> &[usize] {
        let at = match self.cache.iter().position(|(e, _)| *e == epoch) {
            Some(at) => at,
            None => {
                if self.cache.len() == 2 {
                    self.cache.remove(0);
                }
                self.cache.push((epoch, epoch_permutation(self.seed, self.dataset, epoch, self.len)));
                self.cache.len() - 1
            }
        };
        &self.cache[at].1
    }

    /// This rank's part of batch `k` of the dataset.
    pub fn batch(&mut self, k: u64) -> Vec<SampleRef> {
        let start = k * (self.batch * self.world) as u64 + (self.rank * self.batch) as u64;
        (0..self.batch as u64).map(|j| self.at(start + j)).collect()
    }
}
