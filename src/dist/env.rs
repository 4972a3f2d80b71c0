//! The launcher's environment: who this process is in a distributed run.

use super::dist_error;
use crate::error::Result;

/// PyTorch's default rendezvous port, so `torchrun`-style launch scripts work unchanged.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's place in a distributed run, as launchers describe it in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the run.
    pub world_size: usize,
    /// Rank within this node: the GPU ordinal this process uses.
    pub local_rank: usize,
    /// Host of rank 0, where the rendezvous listens.
    pub master_addr: String,
    /// Port of the rendezvous on the master.
    pub master_port: u16,
}

impl DistEnv {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` (as `torchrun`
    /// sets them), falling back to Slurm's `SLURM_PROCID`, `SLURM_NTASKS` and `SLURM_LOCALID`.
    /// `None` when neither `WORLD_SIZE` nor `SLURM_NTASKS` is set (a single-process run).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests, or a launcher that already holds
    /// the values).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let pick = |primary: &'static str, slurm: &'static str| -> Option<(&'static str, String)> {
            var(primary).map(|v| (primary, v)).or_else(|| var(slurm).map(|v| (slurm, v)))
        };
        let Some((ws_name, ws)) = pick("WORLD_SIZE", "SLURM_NTASKS") else {
            return Ok(None);
        };
        let number = |name: &str, value: &str| -> Result<usize> {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| dist_error(format!("{name}={value:?} is not a non-negative integer")))
        };
        let world_size = number(ws_name, &ws)?;
        if world_size == 0 {
            return Err(dist_error(format!("{ws_name}=0: a run needs at least one process")));
        }
        let rank = match pick("RANK", "SLURM_PROCID") {
            Some((name, v)) => number(name, &v)?,
            None if world_size == 1 => 0,
            None => return Err(dist_error(format!("{ws_name}={world_size} but RANK is not set"))),
        };
        if rank >= world_size {
            return Err(dist_error(format!("RANK={rank} is not below WORLD_SIZE={world_size}")));
        }
        let local_rank = match pick("LOCAL_RANK", "SLURM_LOCALID") {
            Some((name, v)) => number(name, &v)?,
            None => rank,
        };
        let master_addr = match var("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            Some(_) => return Err(dist_error("MASTER_ADDR is empty")),
            None if world_size == 1 => "127.0.0.1".to_string(),
            None => return Err(dist_error(format!("WORLD_SIZE={world_size} but MASTER_ADDR is not set"))),
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| dist_error(format!("MASTER_PORT={p:?} is not a port number (1-65535)")))?,
            None => DEFAULT_MASTER_PORT,
        };
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port }))
    }
}
