//! The TCP ring's wire protocol: the header that opens every operation (`OpHeader::check`)
//! on arbitrary bytes, its round trip, the bfloat16 wire encoding, and whole ring operations
//! (all-reduce in f32 and bf16, broadcast, all-gather) on a rank whose neighbours send
//! arbitrary bytes over loopback connections, with the per-message MAC on or off. Nothing may
//! panic or hang; a header is accepted only when it is exactly the one expected.

#![no_main]

use arbitrary::Arbitrary;
use ferry_collective::fuzzing::{
    bf16_round_trip, expect_header, header_bytes, message_tag, ring_with_scripted_peer, Header,
    RingOp, RingResult,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Raw bytes where a header is expected.
    Header {
        ours: Header,
        exact: bool,
        bytes: Vec<u8>,
    },
    /// A header written and read back, with at most one byte changed on the way.
    RoundTrip {
        header: Header,
        exact: bool,
        flip: Option<(u8, u8)>,
    },
    Bf16(u32),
    /// One ring operation against a scripted neighbour.
    Ring {
        rank: u8,
        world: u8,
        piece_floats: u8,
        op: Op,
        /// Messages carry a tag, as in training.
        mac: bool,
        /// Start the neighbour's bytes with the header this rank expects first (and its tag,
        /// with `mac`).
        header_first: bool,
        from_left: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    AllReduce { values: Vec<f32>, bf16: bool },
    Broadcast { len: u16, root: u8 },
    AllGather { mine: Vec<u8>, block_len: u16 },
}

const HEADER_BYTES: usize = 24;

fuzz_target!(|input: Input| match input {
    Input::Header { ours, exact, bytes } => {
        if let Ok(got) = expect_header(ours, exact, &bytes) {
            let (want, kind) = header_bytes(ours);
            assert_eq!(&bytes[..3], b"FRO");
            assert_eq!(bytes[3], kind, "another kind of operation was accepted");
            assert_eq!(got.1, ours.1, "another sequence number was accepted");
            if exact {
                assert_eq!(
                    &bytes[..HEADER_BYTES],
                    &want[..],
                    "a different header passed"
                );
            }
        }
    }
    Input::RoundTrip {
        header,
        exact,
        flip,
    } => {
        let (mut bytes, kind) = header_bytes(header);
        assert_eq!(bytes.len(), HEADER_BYTES);
        let got = expect_header(header, exact, &bytes).expect("our own header");
        assert_eq!(got, (kind, header.1, header.2, header.3));
        if let Some((at, xor)) = flip {
            let at = usize::from(at) % HEADER_BYTES;
            if xor != 0 {
                bytes[at] ^= xor;
                let r = expect_header(header, exact, &bytes);
                // Magic and kind (bytes 0-3) and sequence (8-15) are always checked; detail
                // (4-7) and length (16-23) when exact.
                let checked = at < 4 || (8..16).contains(&at) || exact;
                assert_eq!(r.is_err(), checked, "byte {at} changed: {r:?}");
            }
        }
    }
    Input::Bf16(bits) => {
        let x = f32::from_bits(bits);
        let y = bf16_round_trip(x);
        if x.is_nan() {
            assert!(y.is_nan());
        } else if x.is_infinite() {
            assert_eq!(x, y);
        } else if y.is_finite() {
            assert!(y == 0.0 || y.signum() == x.signum(), "{x} -> {y}");
            // Round to nearest: within half a unit of bfloat16's 8-bit significand.
            assert!(
                (x - y).abs() <= x.abs() / 256.0 + f32::MIN_POSITIVE,
                "{x} -> {y}"
            );
        }
    }
    Input::Ring {
        rank,
        world,
        piece_floats,
        op,
        mac,
        header_first,
        from_left,
    } => {
        let world = 2 + usize::from(world % 3);
        let rank = usize::from(rank) % world;
        let piece_floats = 1 + usize::from(piece_floats % 64);
        let left = (rank + world - 1) % world;
        let (op, first) = match op {
            Op::AllReduce { mut values, bf16 } => {
                values.truncate(256);
                let first = (0, 1, u32::from(bf16), 4 * values.len() as u64);
                (RingOp::AllReduce { values, bf16 }, first)
            }
            Op::Broadcast { len, root } => {
                let len = usize::from(len % 4096);
                let root = usize::from(root) % world;
                (
                    RingOp::Broadcast { len, root },
                    (1, 1, root as u32, len as u64),
                )
            }
            Op::AllGather { mine, block_len } => {
                // The first block to arrive is that of the left neighbour.
                let first = (2, 1, left as u32, u64::from(block_len % 1024));
                (RingOp::AllGather { mine }, first)
            }
        };
        let mut script = Vec::new();
        if header_first {
            script = header_bytes(first).0;
            if mac {
                let tag = message_tag(0, &script);
                script.extend_from_slice(&tag);
            }
        }
        script.extend_from_slice(&from_left);
        let Some(result) =
            ring_with_scripted_peer(rank, world, piece_floats, op.clone(), mac, &script)
        else {
            return;
        };
        match &result {
            Ok(r) => ferry_fuzz::debug(format!("rank {rank} of {world}: {r:?}")),
            Err(e) => ferry_fuzz::debug(format!("rank {rank} of {world}: {e}")),
        }
        match (op, result) {
            (_, Err(_)) => {}
            (RingOp::AllReduce { values, .. }, Ok(RingResult::AllReduce(sums))) => {
                assert_eq!(values.len(), sums.len())
            }
            (RingOp::Broadcast { len, .. }, Ok(RingResult::Broadcast(buf))) => {
                assert_eq!(buf.len(), len)
            }
            (RingOp::AllGather { mine }, Ok(RingResult::AllGather(blocks))) => {
                assert_eq!(blocks.len(), world);
                assert_eq!(blocks[rank], mine);
            }
            (op, Ok(other)) => panic!("{op:?} answered {other:?}"),
        }
    }
});
