//! `cdcl train` over several ranks: who this process is, and how the local ranks start.
//!
//! - **Launched by `torchrun` or Slurm** (`WORLD_SIZE` / `SLURM_NTASKS` in the environment,
//!   see [`DistEnv`]): this process is one rank; on a GPU it joins the others through the TCP
//!   rendezvous and NCCL. `--nproc-per-node` is then ignored.
//! - **`--nproc-per-node N` on GPUs**: this process starts N copies of itself, one per local GPU,
//!   with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1` and a free `MASTER_PORT`
//!   set (as `torchrun --nproc-per-node N` would), and waits for them.
//! - **`--nproc-per-node N` on the CPU backend or the emulator**: the ranks are threads of this
//!   process over the in-process communicator. Separate processes would need a host
//!   communicator over sockets for nothing: CPU ranks share one machine's cores either way, and
//!   threads keep the collectives exact and deterministic (sums in rank order) — the same code
//!   path the tests run. A CPU or emulator rank launched by an external launcher is refused.
//!
//! Rank 0 alone writes checkpoints, logs and the progress bar, and evaluates at the end; every
//! rank starts from rank 0's parameters (loaded from `--resume` or initialised), broadcast when
//! the trainer joins the group, so a run resumes on any number of ranks.

use std::sync::Arc;
use std::time::Duration;

use cdcl::backend::Backend;
use cdcl::dist::{local_group, Communicator, DistEnv};
use cdcl::train::Trainer;
use cdcl::{Error, Result};

/// How long a rank waits for the others at the rendezvous and in a collective.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// This process's (or thread's) part in a run.
#[derive(Clone)]
pub struct Parallel {
    /// The group, for a run of more than one rank.
    pub comm: Option<Arc<dyn Communicator>>,
    /// Per-dataset synchronised BatchNorm.
    pub sync_bn: bool,
}

impl Parallel {
    /// A single-process run.
    pub fn single() -> Self {
        Parallel { comm: None, sync_bn: false }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// Whether this rank writes checkpoints, logs and reports (rank 0).
    pub fn writes(&self) -> bool {
        self.rank() == 0
    }

    /// Makes `trainer` a rank of the group (rank 0's state broadcast; SyncBN as asked).
    pub fn join<B: Backend>(&self, trainer: &mut Trainer<B>) -> Result<()> {
        if let Some(comm) = &self.comm {
            trainer.set_data_parallel(comm.clone())?;
            trainer.set_sync_bn(self.sync_bn)?;
            if self.writes() {
                let bn = if self.sync_bn { "per-dataset SyncBN" } else { "BatchNorm statistics per rank" };
                eprintln!("data-parallel: {} ranks, {bn}", comm.world_size());
            }
        }
        Ok(())
    }
}

/// How `cdcl train` runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Launch {
    /// One process, one rank.
    Single,
    /// N ranks as threads of this process (CPU backend, emulator).
    Threads(usize),
    /// N child processes, one per local GPU.
    Processes(usize),
    /// This process is one rank of a launcher's run.
    Rank(DistEnv),
}

/// Decides from the launcher's environment, `--nproc-per-node` and whether the backend is a
/// host one (CPU, emulator).
pub fn plan(env: Option<DistEnv>, nproc_per_node: usize, host_backend: bool) -> Result<Launch> {
    if nproc_per_node == 0 {
        return Err(Error::InvalidArgument("--nproc-per-node must be at least 1".into()));
    }
    match env {
        Some(env) if env.world_size > 1 => {
            if host_backend {
                return Err(Error::Distributed {
                    message: format!(
                        "rank {} of {}: ranks in separate processes communicate through NCCL and need \
                         --device cuda; CPU and emulator ranks run as threads of one process \
                         (--nproc-per-node N, without a launcher)",
                        env.rank, env.world_size
                    ),
                });
            }
            Ok(Launch::Rank(env))
        }
        _ if nproc_per_node == 1 => Ok(Launch::Single),
        _ if host_backend => Ok(Launch::Threads(nproc_per_node)),
        _ => Ok(Launch::Processes(nproc_per_node)),
    }
}

/// Runs `rank_main` on `n` threads, each a rank of an in-process group; the first error by rank
/// order (a rank that fails breaks the group, so the others stop with an error naming it).
pub fn in_threads(n: usize, sync_bn: bool, rank_main: impl Fn(Parallel) -> Result<()> + Sync) -> Result<()> {
    let comms = local_group(n)?;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let c = c.with_timeout(TIMEOUT);
                let rank_main = &rank_main;
                s.spawn(move || rank_main(Parallel { comm: Some(Arc::new(c)), sync_bn }))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| Err(Error::Distributed { message: format!("rank {r} panicked") }))
            })
            .collect()
    });
    // The root cause rather than the others' "rank r left" errors: a non-distributed error first.
    let mut errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    match errors.iter().position(|e| !matches!(e, Error::Distributed { .. })) {
        Some(i) => Err(errors.swap_remove(i)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// Starts `n` copies of this program (same arguments) as the local ranks of a run on this
/// node, with the launcher's variables set, and waits for every one.
pub fn spawn_processes(n: usize) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Distributed { message: format!("cannot find this program to start its ranks: {e}") })?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => free_port()?.to_string(),
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut children = Vec::with_capacity(n);
    for r in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .spawn()
            .map_err(|e| Error::Distributed { message: format!("cannot start rank {r}: {e}") })?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => failed.push(format!("rank {r} exited with {s}")),
            Err(e) => failed.push(format!("rank {r}: {e}")),
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(Error::Distributed { message: failed.join("; ") }),
    }
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Distributed { message: format!("no free port for the rendezvous: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(world_size: usize) -> DistEnv {
        DistEnv { rank: 0, world_size, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 29500 }
    }

    #[test]
    fn the_launch_follows_the_environment_the_flag_and_the_backend() {
        assert_eq!(plan(None, 1, true).unwrap(), Launch::Single);
        assert_eq!(plan(None, 3, true).unwrap(), Launch::Threads(3));
        assert_eq!(plan(None, 2, false).unwrap(), Launch::Processes(2));
        assert_eq!(plan(Some(env(1)), 1, false).unwrap(), Launch::Single);
        assert_eq!(plan(Some(env(4)), 2, false).unwrap(), Launch::Rank(env(4)));
        assert!(matches!(plan(Some(env(4)), 1, true), Err(Error::Distributed { .. })));
        assert!(matches!(plan(None, 0, true), Err(Error::InvalidArgument(_))));
    }
}
