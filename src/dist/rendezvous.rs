//! The TCP rendezvous: every rank meets rank 0 once, before the first collective, and receives
//! rank 0's payload (NCCL's 128-byte unique id).
//!
//! Protocol, one connection per non-master rank: the rank sends `b"CDCLRDV1"`, its rank and
//! its world size (u32 little-endian each); when every rank has arrived the master answers each
//! with status 0, the payload's length (u32) and the payload. A rank that names another world
//! size, a rank out of range or one that is already there fails the rendezvous on the master
//! and on every connected rank (status 1 and the reason); so does a rank that has not arrived
//! when the timeout expires.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{dist_error, DistEnv};
use crate::error::Result;

const MAGIC: &[u8; 8] = b"CDCLRDV1";
const POLL: Duration = Duration::from_millis(20);
/// Larger payloads are refused: the one we send is NCCL's 128-byte id.
const MAX_PAYLOAD: usize = 1 << 16;

/// How long the rendezvous waits for every rank by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Meets every rank of `env`: rank 0 listens on `MASTER_PORT` (every interface) and returns
/// `make_payload()`; every other rank connects to `MASTER_ADDR:MASTER_PORT` and returns what
/// rank 0 sent. Fails on every rank that is still there if one rank does not arrive in `timeout`.
pub fn rendezvous(env: &DistEnv, make_payload: impl FnOnce() -> Result<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>> {
    if env.rank == 0 {
        let payload = make_payload()?;
        if env.world_size > 1 {
            let listener = TcpListener::bind(("0.0.0.0", env.master_port))
                .map_err(|e| dist_error(format!("rank 0 cannot listen on port {}: {e}", env.master_port)))?;
            serve(listener, env.world_size, &payload, timeout)?;
        }
        Ok(payload)
    } else {
        // An IPv6 literal needs brackets before the port.
        let host = if env.master_addr.contains(':') && !env.master_addr.starts_with('[') {
            format!("[{}]", env.master_addr)
        } else {
            env.master_addr.clone()
        };
        join(&format!("{host}:{}", env.master_port), env.rank, env.world_size, timeout)
    }
}

/// The master's side: waits on `listener` for ranks `1..world_size`, then sends each `payload`.
pub fn serve(listener: TcpListener, world_size: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(dist_error(format!("a rendezvous payload of {} bytes is too large", payload.len())));
    }
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    listener.set_nonblocking(true).map_err(|e| dist_error(format!("rendezvous socket on {addr}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut ranks: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    let mut arrived = 1; // the master itself
    let outcome = loop {
        if arrived == world_size {
            break Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (1..world_size).filter(|&r| ranks[r].is_none()).collect();
            break Err(format!(
                "ranks {missing:?} of {world_size} did not arrive at the rendezvous on {addr} within {timeout:?}"
            ));
        }
        match listener.accept() {
            Ok((mut stream, peer)) => match greet(&mut stream, deadline - now) {
                Ok((rank, ws)) if ws != world_size => {
                    refuse(
                        &mut stream,
                        &format!("world size {ws} of rank {rank} ({peer}) differs from the master's {world_size}"),
                    );
                    break Err(format!("rank {rank} ({peer}) says WORLD_SIZE={ws}, the master has {world_size}"));
                }
                Ok((rank, _)) if rank == 0 || rank >= world_size => {
                    refuse(&mut stream, &format!("rank {rank} is not a worker rank of {world_size}"));
                    break Err(format!("a process ({peer}) says RANK={rank}, not a worker rank of {world_size}"));
                }
                Ok((rank, _)) if ranks[rank].is_some() => {
                    refuse(&mut stream, &format!("rank {rank} is already at the rendezvous"));
                    break Err(format!("rank {rank} arrived twice (again from {peer})"));
                }
                Ok((rank, _)) => {
                    ranks[rank] = Some(stream);
                    arrived += 1;
                }
                // A stray connection that does not speak the protocol is dropped, not fatal.
                Err(_) => {}
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL.min(deadline - now)),
            Err(e) => break Err(format!("rendezvous on {addr}: {e}")),
        }
    };
    match outcome {
        Ok(()) => {
            for (rank, stream) in ranks.iter_mut().enumerate() {
                if let Some(s) = stream {
                    reply(s, 0, payload)
                        .map_err(|e| dist_error(format!("sending the rendezvous payload to rank {rank}: {e}")))?;
                }
            }
            Ok(())
        }
        Err(why) => {
            for s in ranks.iter_mut().flatten() {
                refuse(s, &why);
            }
            Err(dist_error(why))
        }
    }
}

/// A worker's side: connects to the master at `addr` (retrying until `timeout`, the master may
/// start later), announces `rank` and `world_size`, and returns the master's payload.
pub fn join(addr: &str, rank: usize, world_size: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let ctx = |what: String| dist_error(format!("rank {rank} of {world_size}, master {addr}: {what}"));
    let targets: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| ctx(format!("cannot resolve the master's address: {e}")))?.collect();
    let mut stream = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(ctx(format!("could not reach the master within {timeout:?}")));
        }
        let left = (deadline - now).min(Duration::from_secs(5));
        if let Some(s) = targets.iter().find_map(|t| TcpStream::connect_timeout(t, left).ok()) {
            break s;
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
    };
    let hello = [MAGIC.as_slice(), &(rank as u32).to_le_bytes(), &(world_size as u32).to_le_bytes()].concat();
    stream.write_all(&hello).map_err(|e| ctx(format!("sending the greeting: {e}")))?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(|e| ctx(e.to_string()))?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(|e| ctx(format!("no answer from the master within {timeout:?}: {e}")))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ctx(format!("the master announced {len} bytes, more than a rendezvous sends")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(|e| ctx(format!("reading the master's answer: {e}")))?;
    match head[0] {
        0 => Ok(body),
        _ => Err(ctx(format!("the master refused: {}", String::from_utf8_lossy(&body)))),
    }
}

/// Reads a worker's greeting: (rank, world size).
fn greet(stream: &mut TcpStream, left: Duration) -> std::io::Result<(usize, usize)> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(left.clamp(Duration::from_millis(1), Duration::from_secs(10))))?;
    let mut hello = [0u8; 16];
    stream.read_exact(&mut hello)?;
    if &hello[..8] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a cdcl rendezvous greeting"));
    }
    let word = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]) as usize;
    Ok((word(8), word(12)))
}

fn reply(stream: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let msg = [&[status][..], &(body.len() as u32).to_le_bytes(), body].concat();
    stream.write_all(&msg)
}

/// Best effort: the worker may already be gone.
fn refuse(stream: &mut TcpStream, why: &str) {
    let _ = reply(stream, 1, &why.as_bytes()[..why.len().min(MAX_PAYLOAD)]);
}
