//! The distributed layer without a GPU: the in-process communicator, the launcher's
//! environment, the TCP rendezvous over loopback, and NCCL's absence as a typed error.

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use cdcl::dist::{self, local_group, rendezvous, Communicator, DistEnv};
use cdcl::{Device, Error, Tensor};

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
fn on_ranks<T: Send + 'static>(
    comms: Vec<dist::LocalCommunicator>,
    f: impl Fn(usize, &dist::LocalCommunicator) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let f = f.clone();
            thread::spawn(move || f(rank, &comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

fn rank_data(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((rank * 131 + i * 17) % 97) as f32 * 0.37 - 11.0 + 1e-3 * rank as f32).collect()
}

#[test]
fn all_reduce_is_the_rank_order_sum_on_every_rank_and_repeatable() {
    for world in [1usize, 2, 3, 5] {
        let n = 37;
        let mut expected = vec![0.0f32; n];
        for r in 0..world {
            expected.iter_mut().zip(rank_data(r, n)).for_each(|(e, v)| *e += v);
        }
        let results = on_ranks(local_group(world).unwrap(), move |rank, comm| {
            assert_eq!((comm.rank(), comm.world_size()), (rank, world));
            let mut rounds = Vec::new();
            for _ in 0..3 {
                let mut data = rank_data(rank, n);
                comm.all_reduce_sum(&mut data).unwrap();
                rounds.push(data);
            }
            rounds
        });
        for rounds in results {
            for data in rounds {
                // Bitwise: the sum is taken in rank order whichever thread arrives last.
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&data), bits(&expected), "world {world}");
            }
        }
    }
}

#[test]
fn broadcast_and_barrier() {
    let results = on_ranks(local_group(3).unwrap(), |rank, comm| {
        let mut data = rank_data(rank, 9);
        comm.broadcast(&mut data, 2).unwrap();
        comm.barrier().unwrap();
        let mut again = rank_data(rank, 9);
        comm.broadcast(&mut again, 0).unwrap();
        (data, again)
    });
    for (data, again) in results {
        assert_eq!(data, rank_data(2, 9));
        assert_eq!(again, rank_data(0, 9));
    }
}

#[test]
fn tensors_reduce_through_the_device_and_other_dtypes_are_refused() {
    let results = on_ranks(local_group(2).unwrap(), |rank, comm| {
        let dev = Device::emulator();
        let mut t = Tensor::from_slice(&dev, &[2, 3], &rank_data(rank, 6)).unwrap();
        comm.all_reduce_sum_tensor(&mut t).unwrap();
        let mut labels = Tensor::from_slice(&dev, &[2], &[1i32, 2]).unwrap();
        let err = comm.all_reduce_sum_tensor(&mut labels).unwrap_err();
        (t.to_vec::<f32>().unwrap(), err)
    });
    let expected: Vec<f32> = rank_data(0, 6).iter().zip(rank_data(1, 6)).map(|(a, b)| a + b).collect();
    for (sum, err) in results {
        assert_eq!(sum, expected);
        assert!(matches!(err, Error::DTypeMismatch { .. }), "{err}");
    }
}

#[test]
fn ranks_that_disagree_fail_on_every_rank() {
    let results = on_ranks(local_group(2).unwrap(), |rank, comm| {
        let mut data = vec![1.0f32; 3 + rank];
        comm.all_reduce_sum(&mut data).unwrap_err().to_string()
    });
    for msg in results {
        assert!(msg.contains("disagree"), "{msg}");
    }
    let results = on_ranks(local_group(2).unwrap(), |rank, comm| {
        let mut data = vec![1.0f32; 3];
        comm.broadcast(&mut data, rank).unwrap_err().to_string()
    });
    for msg in results {
        assert!(msg.contains("disagree"), "{msg}");
    }
}

#[test]
fn a_missing_rank_times_out_and_breaks_the_group() {
    let mut comms = local_group(3).unwrap().into_iter();
    let r0 = comms.next().unwrap().with_timeout(Duration::from_millis(200));
    let r1 = comms.next().unwrap().with_timeout(Duration::from_secs(30));
    let r2 = comms.next().unwrap();
    let waiting = thread::spawn(move || {
        let mut d = [1.0f32];
        let e = r1.all_reduce_sum(&mut d).unwrap_err();
        (e, r1)
    });
    let start = Instant::now();
    let err = r0.all_reduce_sum(&mut [1.0f32]).unwrap_err().to_string();
    assert!(err.contains("[2]") && err.contains("did not arrive"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // The rank that was waiting is woken with an error, not left hanging.
    let (e1, _r1) = waiting.join().unwrap();
    assert!(e1.to_string().contains("did not arrive"), "{e1}");
    // The late rank finds a broken group.
    let e2 = r2.barrier().unwrap_err().to_string();
    assert!(e2.contains("broken"), "{e2}");
}

#[test]
fn a_rank_that_leaves_wakes_the_others_with_an_error() {
    let mut comms = local_group(2).unwrap().into_iter();
    let r0 = comms.next().unwrap();
    let r1 = comms.next().unwrap();
    let waiting = thread::spawn(move || r0.barrier().unwrap_err().to_string());
    thread::sleep(Duration::from_millis(50));
    drop(r1);
    let msg = waiting.join().unwrap();
    assert!(msg.contains("rank 1 has left"), "{msg}");
    assert!(local_group(0).is_err());
}

fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
}

#[test]
fn launcher_environment() {
    assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
    let torchrun = DistEnv::from_vars(vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        torchrun,
        DistEnv { rank: 3, world_size: 8, local_rank: 1, master_addr: "node0".into(), master_port: 1234 }
    );
    let slurm = DistEnv::from_vars(vars(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "6"),
        ("SLURM_LOCALID", "2"),
        ("MASTER_ADDR", "10.0.0.1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_port), (5, 6, 2, 29500));
    let single = DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
    assert_eq!((single.rank, single.local_rank, single.master_addr.as_str()), (0, 0, "127.0.0.1"));

    let bad: &[(&[(&str, &str)], &str)] = &[
        (&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")], "RANK=2 is not below WORLD_SIZE=2"),
        (&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")], "RANK is not set"),
        (&[("WORLD_SIZE", "2"), ("RANK", "1")], "MASTER_ADDR is not set"),
        (&[("WORLD_SIZE", "two")], "WORLD_SIZE=\"two\""),
        (&[("WORLD_SIZE", "0")], "at least one process"),
        (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "70000")], "MASTER_PORT"),
    ];
    for (pairs, expected) in bad {
        let err = DistEnv::from_vars(vars(pairs)).unwrap_err();
        assert!(matches!(err, Error::Distributed { .. }), "{err}");
        assert!(err.to_string().contains(expected), "{err} should say {expected}");
    }
}

const SHORT: Duration = Duration::from_millis(600);

fn master(world: usize, timeout: Duration) -> (String, thread::JoinHandle<cdcl::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || rendezvous::serve(listener, world, b"the-nccl-id", timeout));
    (addr, handle)
}

#[test]
fn rendezvous_hands_every_rank_the_payload() {
    let (addr, m) = master(4, Duration::from_secs(30));
    let workers: Vec<_> = (1..4)
        .rev() // arrival order does not matter
        .map(|rank| {
            let addr = addr.clone();
            thread::spawn(move || rendezvous::join(&addr, rank, 4, Duration::from_secs(30)))
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap().unwrap(), b"the-nccl-id");
    }
    m.join().unwrap().unwrap();

    // Through the environment, the way a launched process calls it (world size 1: no network).
    let env = DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
    assert_eq!(rendezvous::rendezvous(&env, || Ok(vec![7]), SHORT).unwrap(), vec![7]);
}

#[test]
fn rendezvous_with_a_missing_rank_times_out_on_the_master_and_the_workers() {
    let (addr, m) = master(3, SHORT);
    let w1 = thread::spawn(move || rendezvous::join(&addr, 1, 3, Duration::from_secs(30)));
    let err = m.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("ranks [2] of 3 did not arrive"), "{err}");
    let werr = w1.join().unwrap().unwrap_err().to_string();
    assert!(werr.contains("master refused") && werr.contains("[2]"), "{werr}");
}

#[test]
fn rendezvous_rejects_a_wrong_world_size_and_a_duplicate_rank() {
    let (addr, m) = master(3, Duration::from_secs(30));
    let werr = rendezvous::join(&addr, 1, 4, Duration::from_secs(30)).unwrap_err().to_string();
    assert!(werr.contains("world size 4") && werr.contains("master's 3"), "{werr}");
    let err = m.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("WORLD_SIZE=4") && err.contains("master has 3"), "{err}");

    // Two processes both claiming rank 1: whichever arrives second is the duplicate.
    let (addr, m) = master(3, Duration::from_secs(30));
    let twins: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || rendezvous::join(&addr, 1, 3, Duration::from_secs(30)).unwrap_err().to_string())
        })
        .collect();
    let errs: Vec<String> = twins.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(errs.iter().any(|e| e.contains("rank 1 is already at the rendezvous")), "{errs:?}");
    assert!(errs.iter().all(|e| e.contains("master refused")), "{errs:?}");
    assert!(m.join().unwrap().unwrap_err().to_string().contains("arrived twice"));
}

#[test]
fn a_worker_without_a_master_gives_up_with_a_clear_error() {
    // A port nothing listens on: bind one, note it, close it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = rendezvous::join(&format!("127.0.0.1:{port}"), 1, 2, SHORT).unwrap_err();
    assert!(matches!(err, Error::Distributed { .. }));
    assert!(err.to_string().contains("could not reach the master"), "{err}");
}

#[test]
fn nccl_without_a_gpu_is_a_typed_error() {
    let env = DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
    let err = dist::NcclCommunicator::init(&Device::emulator(), &env, SHORT).err().expect("no NCCL on the emulator");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    if !dist::nccl_available() {
        assert!(matches!(dist::nccl_unique_id(), Err(Error::NoNccl)));
    }
}
