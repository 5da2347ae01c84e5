//! A host on the path between two ranks, and a rank that lies about lengths: what the ring
//! must refuse after a valid handshake (issue 22).

use super::message_mac::MessageMac;
use super::tests::{input, listeners, spec, SMALL};
use super::wire::{OpHeader, OpKind};
use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;

/// Forwards one connection from `listener` to `target` in both directions, flipping one bit
/// of the byte at `flip_at` of the stream from the connector to the acceptor.
fn tampering_proxy(listener: TcpListener, target: String, flip_at: usize) {
    thread::spawn(move || {
        let Ok((from_connector, _)) = listener.accept() else {
            return;
        };
        let Ok(to_acceptor) = TcpStream::connect(&target) else {
            return;
        };
        let (mut c_read, mut a_write) = (
            from_connector.try_clone().expect("clone"),
            to_acceptor.try_clone().expect("clone"),
        );
        thread::spawn(move || {
            let mut b = [0u8; 4096];
            let mut seen = 0usize;
            while let Ok(n) = c_read.read(&mut b) {
                if n == 0 {
                    break;
                }
                if (seen..seen + n).contains(&flip_at) {
                    b[flip_at - seen] ^= 0x40;
                }
                seen += n;
                if a_write.write_all(&b[..n]).is_err() {
                    break;
                }
            }
            let _ = a_write.shutdown(std::net::Shutdown::Write);
        });
        let (mut a_read, mut c_write) = (to_acceptor, from_connector);
        let _ = std::io::copy(&mut a_read, &mut c_write);
        let _ = c_write.shutdown(std::net::Shutdown::Write);
    });
}

/// One bit of a gradient flipped on the path between rank 0 and rank 1: before messages
/// carried a MAC, the all-reduce succeeded with a wrong sum on both ranks.
#[test]
fn a_bit_flipped_on_the_path_fails_the_all_reduce_instead_of_changing_the_sum() {
    let (ls, peers) = listeners(2);
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let mut rank0_peers = peers.clone();
    rank0_peers[1] = proxy.local_addr().expect("addr").to_string();
    // Well past the handshake and the transport negotiation: inside the second piece of the
    // all-reduce's data (pieces of 1,000 floats).
    tampering_proxy(proxy, peers[1].clone(), 5_000);

    let len = 20_000;
    let timeout = Duration::from_secs(10);
    let results: Vec<Result<Vec<f32>, String>> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let rank_peers = if rank == 0 { &rank0_peers } else { &peers };
                s.spawn(move || {
                    let mut ring = RingAllReduce::connect_tuned(
                        l,
                        &spec(rank, rank_peers, timeout),
                        Transport::Tcp,
                        SMALL,
                    )
                    .map_err(|e| format!("connect: {e}"))?;
                    let mut buf = input(rank, len);
                    ring.all_reduce_sum_f32(&mut buf)
                        .map_err(|e| e.to_string())?;
                    Ok(buf)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    });
    for (rank, r) in results.iter().enumerate() {
        if let Ok(buf) = r {
            let expected: Vec<f32> = (0..len)
                .map(|i| input(0, len)[i] + input(1, len)[i])
                .collect();
            let wrong = buf.iter().zip(&expected).filter(|(a, b)| a != b).count();
            panic!(
                "rank {rank} finished the all-reduce despite the flipped bit ({wrong} wrong sums)"
            );
        }
    }
    let rank1 = results[1].as_ref().expect_err("checked above");
    assert!(rank1.contains("failed authentication"), "rank 1: {rank1}");
}

/// A peer that passed the handshake announces an all-gather block of 1 TiB: refused at
/// once, before anything is allocated or read, instead of waiting for the bytes.
#[test]
fn an_all_gather_block_over_the_bound_is_refused_before_anything_is_allocated() {
    let (ls, peers) = listeners(2);
    let timeout = Duration::from_secs(8);
    let liar = spec(1, &peers, timeout);
    thread::scope(|s| {
        let honest = s.spawn(|| {
            let mut ring = RingAllReduce::connect_tuned(
                &ls[0],
                &spec(0, &peers, timeout),
                Transport::Tcp,
                SMALL,
            )
            .expect("connect");
            let t0 = std::time::Instant::now();
            let r = ring.all_gather(b"mine");
            (r, t0.elapsed())
        });
        // Rank 1 by hand: a valid handshake both ways, an honest transport negotiation
        // (all-gather #1: "tcp"), then all-gather #2 announcing 1 TiB.
        let deadline = std::time::Instant::now() + timeout;
        // Rank 0's messages to us stay unread, but the connection must stay open.
        let (from_rank0, (to_rank0, key)) = thread::scope(|inner| {
            let accepting = inner.spawn(|| handshake::accept(&ls[1], &liar, 0, deadline));
            let connected = handshake::connect(
                &liar,
                0,
                deadline,
                &std::sync::atomic::AtomicBool::new(false),
            );
            let accepted = accepting.join().expect("accept thread").expect("accept");
            (accepted, connected.expect("connect"))
        });
        let mac = MessageMac::new(key);
        let header = |seq: u64, len: u64| OpHeader {
            kind: OpKind::AllGather,
            seq,
            detail: 1,
            len,
        };
        mac.send(&to_rank0, &header(1, 1).encode()).expect("header");
        mac.send(&to_rank0, &[Transport::Tcp.code()])
            .expect("block");
        mac.send(&to_rank0, &header(2, 1 << 40).encode())
            .expect("header");

        let (r, took) = honest.join().expect("rank 0 thread");
        let e = r.expect_err("a 1 TiB block was accepted");
        assert!(
            matches!(e, CollectiveError::Protocol { .. })
                && e.to_string().contains("1099511627776"),
            "{e}"
        );
        assert!(took < Duration::from_secs(2), "refused only after {took:?}");
        drop((to_rank0, from_rank0));
    });
}
