//! Ranks as threads of one process: the communicator of the CPU backend and the emulator.
//!
//! Each collective is a rendezvous on one mutex: every rank deposits its contribution, the last
//! to arrive computes the result (sums in rank order, so the bits do not depend on which thread
//! came last) and wakes the others. A rank that waits longer than the group's timeout, or whose
//! communicator is dropped while others wait, breaks the group: every later collective on any
//! rank is an error instead of a hang.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{dist_error, Communicator};
use crate::error::Result;

/// How long a rank waits for the others in one collective by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduceSum,
    Broadcast { root: usize },
    Barrier,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduceSum => "all_reduce_sum",
            Kind::Broadcast { .. } => "broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

struct State {
    generation: u64,
    arrived: usize,
    /// The collective the first arrival announced, with its length.
    current: Option<(Kind, usize)>,
    /// Set when a later arrival announced a different collective or length.
    mismatch: Option<String>,
    contributions: Vec<Option<Vec<f32>>>,
    /// The last completed collective's result.
    result: std::result::Result<Arc<Vec<f32>>, String>,
    /// Why the group can no longer be used.
    broken: Option<String>,
}

struct Shared {
    world_size: usize,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank thread that panicked while holding the lock leaves plain data behind; the
        // group is marked broken by that rank's Drop, so the poison carries no extra meaning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank of an in-process group made by [`local_group`]. Move each into its own thread.
pub struct LocalCommunicator {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

/// A group of `world_size` in-process ranks, rank `i` at index `i`, waiting at most
/// [`DEFAULT_TIMEOUT`] for each other in a collective.
pub fn local_group(world_size: usize) -> Result<Vec<LocalCommunicator>> {
    if world_size == 0 {
        return Err(dist_error("a group needs at least one rank"));
    }
    let shared = Arc::new(Shared {
        world_size,
        state: Mutex::new(State {
            generation: 0,
            arrived: 0,
            current: None,
            mismatch: None,
            contributions: vec![None; world_size],
            result: Ok(Arc::new(Vec::new())),
            broken: None,
        }),
        wake: Condvar::new(),
    });
    Ok((0..world_size)
        .map(|rank| LocalCommunicator { rank, shared: shared.clone(), timeout: DEFAULT_TIMEOUT })
        .collect())
}

impl LocalCommunicator {
    /// The same rank with another wait limit per collective.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn collective(&self, kind: Kind, data: &[f32]) -> Result<Arc<Vec<f32>>> {
        let world = self.shared.world_size;
        let mut st = self.shared.lock();
        if let Some(why) = &st.broken {
            return Err(dist_error(format!("rank {}: {} on a broken group: {why}", self.rank, kind.name())));
        }
        let announced = (kind, data.len());
        match st.current {
            None => st.current = Some(announced),
            Some(first) if first != announced && st.mismatch.is_none() => {
                st.mismatch = Some(format!(
                    "ranks disagree on the collective: {} of {} values on one rank, {} of {} on rank {}",
                    first.0.name(),
                    first.1,
                    kind.name(),
                    data.len(),
                    self.rank
                ));
            }
            Some(_) => {}
        }
        let contributes = match kind {
            Kind::AllReduceSum => true,
            Kind::Broadcast { root } => root == self.rank,
            Kind::Barrier => false,
        };
        st.contributions[self.rank] = Some(if contributes { data.to_vec() } else { Vec::new() });
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == world {
            let result = match st.mismatch.take() {
                Some(why) => Err(why),
                None => Ok(Arc::new(combine(kind, data.len(), &st.contributions))),
            };
            st.result = result;
            st.arrived = 0;
            st.current = None;
            st.contributions.iter_mut().for_each(|c| *c = None);
            st.generation += 1;
            self.shared.wake.notify_all();
        } else {
            let deadline = Instant::now() + self.timeout;
            while st.generation == generation {
                if let Some(why) = &st.broken {
                    return Err(dist_error(format!("rank {}: {} interrupted: {why}", self.rank, kind.name())));
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| st.contributions[r].is_none()).collect();
                    let why = format!(
                        "rank {} waited {:?} in {} for ranks {missing:?}, which did not arrive",
                        self.rank,
                        self.timeout,
                        kind.name()
                    );
                    st.broken = Some(why.clone());
                    self.shared.wake.notify_all();
                    return Err(dist_error(why));
                }
                st = self.shared.wake.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        st.result.clone().map_err(|why| dist_error(format!("rank {}: {why}", self.rank)))
    }
}

/// The result of a completed collective from every rank's contribution (rank order).
fn combine(kind: Kind, len: usize, contributions: &[Option<Vec<f32>>]) -> Vec<f32> {
    match kind {
        Kind::AllReduceSum => {
            let mut sum = vec![0.0f32; len];
            // Rank order, one f32 addition per rank: the bits depend on the ranks' data only.
            for c in contributions.iter().flatten() {
                sum.iter_mut().zip(c).for_each(|(s, v)| *s += v);
            }
            sum
        }
        Kind::Broadcast { root } => contributions[root].clone().unwrap_or_default(),
        Kind::Barrier => Vec::new(),
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let sum = self.collective(Kind::AllReduceSum, data)?;
        data.copy_from_slice(&sum);
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.shared.world_size {
            return Err(dist_error(format!("broadcast root {root} is not a rank of {}", self.shared.world_size)));
        }
        let value = self.collective(Kind::Broadcast { root }, data)?;
        data.copy_from_slice(&value);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.collective(Kind::Barrier, &[]).map(|_| ())
    }
}

impl Drop for LocalCommunicator {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        // Leaving between collectives is the normal end of a rank; the others only notice if
        // they try another collective (which could never complete).
        if st.broken.is_none() {
            st.broken = Some(format!("rank {} has left the group", self.rank));
        }
        self.shared.wake.notify_all();
    }
}
