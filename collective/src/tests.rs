//! Groups of ranks as threads of this process (each with its own listener on 127.0.0.1:0),
//! and one test with a real child process killed by SIGKILL.

use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

const TOKEN: &str = "test-token";
const GENERATION: u64 = 7;
const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Shm];

/// Short pieces and shared-memory slots, so short buffers still run through many pipelined
/// pieces and wrap around the slots many times.
pub(super) const SMALL: Tuning = Tuning {
    piece_floats: 1000,
    shm_slot_floats: 4096,
};

pub(super) fn listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs = ls
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    (ls, addrs)
}

pub(super) fn spec(rank: usize, peers: &[String], timeout: Duration) -> GroupSpec {
    GroupSpec {
        rank,
        world_size: peers.len(),
        peers: peers.to_vec(),
        generation: GENERATION,
        job_token: TOKEN.into(),
        timeout,
        message_mac: true,
    }
}

/// Runs `body(rank, collective)` on one thread per rank; returns the results by rank.
fn with_group<T: Send>(
    world: usize,
    transport: Transport,
    tuning: Tuning,
    timeout: Duration,
    body: impl Fn(usize, RingAllReduce) -> T + Sync,
) -> Vec<T> {
    let (ls, peers) = listeners(world);
    thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, body) = (&peers, &body);
                s.spawn(move || {
                    let ring = RingAllReduce::connect_tuned(
                        l,
                        &spec(rank, peers, timeout),
                        transport,
                        tuning,
                    )
                    .expect("connect");
                    body(rank, ring)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

/// Deterministic values in [-5, 5) whose sums are not exact, so summation order shows.
pub(super) fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len as u64)
        .map(|i| ((i * 2_654_435_761 + rank as u64 * 40_503) % 10_007) as f32 / 1000.7 - 5.0)
        .collect()
}

fn check_all_reduce(transport: Transport, world: usize) {
    let lengths = [0, 1, 7, 1_000_003];
    for tuning in [SMALL, Tuning::default()] {
        let results = with_group(
            world,
            transport,
            tuning,
            Duration::from_secs(10),
            |rank, mut ring| {
                if world > 1 {
                    let expected = if transport == Transport::Shm {
                        "shm"
                    } else {
                        "tcp"
                    };
                    assert_eq!(ring.transport(), expected);
                }
                lengths
                    .iter()
                    .map(|&len| {
                        let mut buf = input(rank, len);
                        ring.all_reduce_sum_f32(&mut buf).expect("all_reduce");
                        buf
                    })
                    .collect::<Vec<_>>()
            },
        );
        for (k, &len) in lengths.iter().enumerate() {
            let first = &results[0][k];
            assert_eq!(first.len(), len);
            // Full check of the whole buffer against a sum in f64.
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            for i in 0..len {
                let want: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                assert!(
                    (first[i] as f64 - want).abs() < 1e-4,
                    "{transport:?} world {world} len {len} [{i}]"
                );
            }
            for (rank, r) in results.iter().enumerate() {
                let same = r[k]
                    .iter()
                    .zip(first)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{transport:?} world {world} len {len}: rank {rank} differs from rank 0"
                );
            }
        }
    }
}

#[test]
fn all_reduce_tcp_world_1() {
    check_all_reduce(Transport::Tcp, 1);
}
#[test]
fn all_reduce_tcp_world_2() {
    check_all_reduce(Transport::Tcp, 2);
}
#[test]
fn all_reduce_tcp_world_3() {
    check_all_reduce(Transport::Tcp, 3);
}
#[test]
fn all_reduce_tcp_world_4() {
    check_all_reduce(Transport::Tcp, 4);
}
#[test]
fn all_reduce_shm_world_1() {
    check_all_reduce(Transport::Shm, 1);
}
#[test]
fn all_reduce_shm_world_2() {
    check_all_reduce(Transport::Shm, 2);
}
#[test]
fn all_reduce_shm_world_3() {
    check_all_reduce(Transport::Shm, 3);
}
#[test]
fn all_reduce_shm_world_4() {
    check_all_reduce(Transport::Shm, 4);
}

#[test]
fn auto_picks_shared_memory_on_loopback() {
    let names = with_group(
        2,
        Transport::Auto,
        SMALL,
        Duration::from_secs(5),
        |_, ring| ring.transport(),
    );
    assert_eq!(names, ["shm", "shm"]);
}

#[test]
fn one_tcp_vote_keeps_the_group_on_tcp() {
    let (ls, peers) = listeners(2);
    let names: Vec<&str> = thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = &peers;
                let t = if rank == 1 {
                    Transport::Tcp
                } else {
                    Transport::Auto
                };
                s.spawn(move || {
                    RingAllReduce::connect_with(l, &spec(rank, peers, Duration::from_secs(5)), t)
                        .expect("connect")
                        .transport()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    assert_eq!(names, ["tcp", "tcp"]);
}

#[test]
fn broadcast_from_every_root() {
    for transport in TRANSPORTS {
        for world in 1..=4 {
            let lengths = [0usize, 5, 3_000_001];
            let results = with_group(
                world,
                transport,
                SMALL,
                Duration::from_secs(10),
                |rank, mut ring| {
                    let mut out = Vec::new();
                    for root in 0..world {
                        for &len in &lengths {
                            let mut buf: Vec<u8> =
                                (0..len).map(|i| (i * 31 + rank * 7 + root) as u8).collect();
                            ring.broadcast_bytes(&mut buf, root).expect("broadcast");
                            out.push(buf);
                        }
                    }
                    out
                },
            );
            for r in &results {
                let mut k = 0;
                for root in 0..world {
                    for &len in &lengths {
                        let want: Vec<u8> =
                            (0..len).map(|i| (i * 31 + root * 7 + root) as u8).collect();
                        assert!(
                            r[k] == want,
                            "{transport:?} world {world} root {root} len {len}"
                        );
                        k += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn all_gather_blocks_of_different_lengths() {
    for world in 1..=4 {
        let block =
            |rank: usize| -> Vec<u8> { (0..rank * 100_003).map(|i| (i + rank) as u8).collect() };
        let results = with_group(
            world,
            Transport::Tcp,
            SMALL,
            Duration::from_secs(10),
            |rank, mut ring| ring.all_gather(&block(rank)).expect("all_gather"),
        );
        for r in results {
            assert_eq!(r.len(), world);
            for (owner, b) in r.iter().enumerate() {
                assert!(*b == block(owner), "world {world}: block of rank {owner}");
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    let arrived = AtomicUsize::new(0);
    let seen = with_group(
        3,
        Transport::Auto,
        SMALL,
        Duration::from_secs(5),
        |rank, mut ring| {
            thread::sleep(Duration::from_millis(100 * rank as u64));
            arrived.fetch_add(1, Ordering::SeqCst);
            ring.barrier().expect("barrier");
            arrived.load(Ordering::SeqCst)
        },
    );
    assert_eq!(seen, [3, 3, 3]);
}

#[test]
fn tensor_methods_check_their_arguments() {
    with_group(
        2,
        Transport::Auto,
        SMALL,
        Duration::from_secs(5),
        |rank, mut ring| {
            let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (rank as f64 + 1.0);
            ring.all_reduce_sum(&mut t).expect("all_reduce_sum");
            assert_eq!(Vec::<f32>::try_from(&t).expect("to vec"), [3.0, 6.0, 9.0]);

            let mut ints = Tensor::from_slice(&[rank as i64 * 10, 7]);
            let err = ring
                .all_reduce_sum(&mut ints)
                .expect_err("int64 all-reduce");
            assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
            let mut strided = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
            let err = ring
                .all_reduce_sum(&mut strided)
                .expect_err("non-contiguous all-reduce");
            assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");

            // Rejected arguments do not break the group; broadcast takes any dtype.
            ring.broadcast(&mut ints, 1).expect("broadcast");
            assert_eq!(Vec::<i64>::try_from(&ints).expect("to vec"), [10, 7]);
            let err = ring
                .broadcast(&mut ints, 2)
                .expect_err("root outside the world");
            assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
        },
    );
}

#[test]
fn wrong_token_fails_within_the_timeout() {
    let (ls, peers) = listeners(2);
    let start = Instant::now();
    let errors: Vec<CollectiveError> = thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let mut sp = spec(rank, &peers, Duration::from_millis(800));
                if rank == 1 {
                    sp.job_token = "another job".into();
                }
                s.spawn(move || RingAllReduce::connect_with(l, &sp, Transport::Auto).err())
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank").expect("must fail"))
            .collect()
    });
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    for e in errors {
        assert!(matches!(e, CollectiveError::Handshake { .. }), "{e}");
    }
}

#[test]
fn stale_generation_fails_within_the_timeout() {
    let (ls, peers) = listeners(2);
    let errors: Vec<CollectiveError> = thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let mut sp = spec(rank, &peers, Duration::from_millis(800));
                sp.generation -= rank as u64;
                s.spawn(move || RingAllReduce::connect_with(l, &sp, Transport::Auto).err())
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank").expect("must fail"))
            .collect()
    });
    for e in errors {
        assert!(matches!(e, CollectiveError::Handshake { .. }), "{e}");
    }
}

/// Rank 1 drops its collective while rank 0 is inside an all-reduce; rank 0 must fail at
/// once, not after its 20 s timeout, and stay failed.
#[test]
fn peer_dropped_mid_operation_fails_promptly() {
    for transport in TRANSPORTS {
        let waited = with_group(
            2,
            transport,
            Tuning::default(),
            Duration::from_secs(20),
            |rank, mut ring| {
                let mut buf = vec![1.0f32; 4 << 20];
                ring.all_reduce_sum_f32(&mut buf).expect("first all_reduce");
                if rank == 1 {
                    thread::sleep(Duration::from_millis(200));
                    drop(ring);
                    return Duration::ZERO;
                }
                let t0 = Instant::now();
                let err = ring.all_reduce_sum_f32(&mut buf).expect_err("peer is gone");
                assert!(
                    matches!(
                        err,
                        CollectiveError::PeerClosed { peer: 1, .. }
                            | CollectiveError::Aborted { .. }
                    ),
                    "{transport:?}: {err}"
                );
                let waited = t0.elapsed();
                assert!(matches!(ring.barrier(), Err(CollectiveError::Broken)));
                waited
            },
        );
        // Rank 1 dropped ~200 ms into rank 0's operation.
        assert!(
            waited[0] > Duration::from_millis(100) && waited[0] < Duration::from_secs(1),
            "{transport:?}: {:?}",
            waited[0]
        );
    }
}

#[test]
fn wedged_peer_times_out() {
    for transport in TRANSPORTS {
        let timeout = Duration::from_millis(500);
        let outcomes = with_group(2, transport, SMALL, timeout, |rank, mut ring| {
            let mut buf = vec![1.0f32; 10_000];
            if rank == 1 {
                // Alive but not taking part until rank 0 has given up.
                thread::sleep(Duration::from_millis(1000));
            }
            let t0 = Instant::now();
            let err = ring.all_reduce_sum_f32(&mut buf).expect_err("must fail");
            (err, t0.elapsed())
        });
        let (err, waited) = &outcomes[0];
        assert!(
            matches!(err, CollectiveError::Timeout { peer: 1, .. }),
            "{transport:?}: {err}"
        );
        assert!(
            *waited >= timeout * 4 / 5 && *waited < timeout * 3,
            "{transport:?}: {waited:?}"
        );
        // The late rank finds the group abandoned at once.
        let (err, waited) = &outcomes[1];
        assert!(
            !matches!(err, CollectiveError::Timeout { .. }),
            "{transport:?}: {err}"
        );
        assert!(
            *waited < Duration::from_millis(300),
            "{transport:?}: {waited:?}"
        );
    }
}

const CHILD_ENV: &str = "FERRY_RING_TEST_CHILD";

/// Rank 1 of `sigkilled_peer_fails_the_survivor_promptly`, run in a child process: reduces in
/// a loop until killed.
#[test]
#[ignore = "the child process of sigkilled_peer_fails_the_survivor_promptly"]
fn sigkill_child_rank() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (parent, transport) = cfg.split_once(',').expect("addr,transport");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mine = listener.local_addr().expect("addr").to_string();
    println!("CHILD_ADDR {mine}");
    let peers = [parent.to_string(), mine];
    let transport: Transport = transport.parse().expect("transport");
    let mut ring = RingAllReduce::connect_with(
        &listener,
        &spec(1, &peers, Duration::from_secs(30)),
        transport,
    )
    .expect("connect");
    let mut buf = vec![1.0f32; 4 << 20];
    loop {
        buf.fill(1.0);
        if ring.all_reduce_sum_f32(&mut buf).is_err() {
            std::process::exit(3);
        }
    }
}

#[test]
fn sigkilled_peer_fails_the_survivor_promptly() {
    for transport in ["tcp", "shm"] {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mine = listener.local_addr().expect("addr").to_string();
        let crate_path = module_path!().split_once("::").map_or("", |(_, p)| p);
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                &format!("{crate_path}::sigkill_child_rank"),
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, format!("{mine},{transport}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let child_addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("CHILD_ADDR ").map(str::to_string))
            .expect("child address");
        let peers = [mine, child_addr];
        let mut ring = RingAllReduce::connect_with(
            &listener,
            &spec(0, &peers, Duration::from_secs(30)),
            transport.parse().expect("transport"),
        )
        .expect("connect");
        assert_eq!(ring.transport(), transport);
        let mut buf = vec![1.0f32; 4 << 20];
        for _ in 0..3 {
            buf.fill(1.0);
            ring.all_reduce_sum_f32(&mut buf)
                .expect("all_reduce with a live child");
            assert!(buf.iter().all(|&x| x == 2.0));
        }
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            let at = Instant::now();
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            at
        });
        let err = loop {
            buf.fill(1.0);
            if let Err(e) = ring.all_reduce_sum_f32(&mut buf) {
                break e;
            }
        };
        let failed_at = Instant::now();
        let killed_at = killer.join().expect("killer");
        let delay = failed_at.saturating_duration_since(killed_at);
        assert!(
            delay < Duration::from_secs(2),
            "{transport}: failed {delay:?} after the kill"
        );
        assert!(
            !matches!(err, CollectiveError::Timeout { .. }),
            "{transport}: {err}"
        );
    }
}

/// bfloat16 on the wire: every rank ends with the same sums, each a bfloat16 value, within
/// bfloat16's rounding of the exact sum (a partial sum is rounded once per hop); a world of
/// one leaves the buffer alone; a rank asking for float32 while its peers send bfloat16 fails.
#[test]
fn bf16_wire_all_reduce_is_identical_on_every_rank_and_within_bf16_rounding() {
    for transport in TRANSPORTS {
        for world in [1, 2, 3] {
            let len = 100_003;
            let results = with_group(
                world,
                transport,
                SMALL,
                Duration::from_secs(10),
                |rank, mut ring| {
                    let mut buf = input(rank, len);
                    ring.all_reduce_sum_wire(&mut buf, Wire::Bf16)
                        .expect("all_reduce");
                    buf
                },
            );
            if world == 1 {
                assert_eq!(results[0], input(0, len));
                continue;
            }
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            for i in 0..len {
                let got = results[0][i];
                assert_eq!(
                    got.to_bits() & 0xffff,
                    0,
                    "[{i}] {got} is not a bfloat16 value"
                );
                let want: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                // bfloat16 keeps 8 significant bits: one rounding is at most 2^-8 relative;
                // world - 1 hops and the final rounding of partial sums of at most 5·world.
                let bound = world as f64 * 5.0 * world as f64 * 2f64.powi(-8);
                assert!(
                    (got as f64 - want).abs() <= bound,
                    "{transport:?} world {world} [{i}]: {got} vs {want}"
                );
            }
            for r in &results {
                assert!(
                    r.iter()
                        .zip(&results[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{transport:?} world {world}: ranks differ"
                );
            }
        }
    }
    // Two ranks that disagree on the wire format fail at once instead of misreading bytes.
    let results = with_group(
        2,
        Transport::Tcp,
        SMALL,
        Duration::from_secs(5),
        |rank, mut ring| {
            let mut buf = input(rank, 1000);
            let wire = if rank == 0 { Wire::Bf16 } else { Wire::F32 };
            ring.all_reduce_sum_wire(&mut buf, wire).map(|_| ())
        },
    );
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
}
