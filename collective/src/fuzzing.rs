//! Entry points for the fuzz targets in `fuzz/` (`ring_wire`, `ring_handshake`): what they
//! need of the ring's private wire format, handshake and TCP ring, without making those
//! public. Not an API: nothing else may use it.

use super::handshake::fuzzing::{discard, loopback_pair};
pub use super::handshake::fuzzing::{FuzzLink, Reply, ACCEPTED_BYTE};
use super::message_mac::{LinkKey, MessageMac, TAG_BYTES};
use super::ring::TcpRing;
use super::wire::{self, OpHeader, OpKind, HEADER_BYTES};
use super::CollectiveError;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

/// An operation header as plain numbers: (kind, seq, detail, len).
pub type Header = (u8, u64, u32, u64);

fn op_kind(kind: u8) -> OpKind {
    match kind % 3 {
        0 => OpKind::AllReduce,
        1 => OpKind::Broadcast,
        _ => OpKind::AllGather,
    }
}

/// The header a rank expecting operation `ours` accepts from the first header-sized bytes of
/// `bytes` ([`OpHeader::check`]); `ours.0` picks the kind modulo 3. Fewer bytes than a
/// header are refused, as the ring's read of them would fail.
pub fn expect_header(ours: Header, exact: bool, bytes: &[u8]) -> Result<Header, CollectiveError> {
    let (kind, seq, detail, len) = ours;
    let h = OpHeader {
        kind: op_kind(kind),
        seq,
        detail,
        len,
    };
    let Some(b) = bytes.get(..HEADER_BYTES).and_then(|b| b.try_into().ok()) else {
        return Err(CollectiveError::Protocol {
            peer: 1,
            op: h.kind.name(),
            reason: format!("{} bytes, a header has {HEADER_BYTES}", bytes.len()),
        });
    };
    let got = h.check(b, 1, exact)?;
    Ok((got.kind as u8, got.seq, got.detail, got.len))
}

/// The bytes [`OpHeader::encode`] gives for `header` (kind modulo 3), and the kind byte it
/// carries.
pub fn header_bytes(header: Header) -> (Vec<u8>, u8) {
    let (kind, seq, detail, len) = header;
    let kind = op_kind(kind);
    let b = OpHeader {
        kind,
        seq,
        detail,
        len,
    }
    .encode();
    (b.to_vec(), kind as u8)
}

/// The key of every link of [`ring_with_scripted_peer`] when it authenticates messages.
const FUZZ_KEY: LinkKey = [0x3c; 32];

/// The tag that authenticates message number `number` (counted from 0 on its link) with
/// bytes `bytes`, under the key [`ring_with_scripted_peer`] uses: a script can then carry
/// valid messages as far as the fuzzer likes.
pub fn message_tag(number: u64, bytes: &[u8]) -> [u8; TAG_BYTES] {
    *MessageMac::tag(&FUZZ_KEY, number, bytes).as_bytes()
}

/// float32 -> bfloat16 -> float32, as the bf16 wire carries a value.
pub fn bf16_round_trip(x: f32) -> f32 {
    wire::from_bf16(wire::to_bf16(x))
}

/// One operation of [`TcpRing`].
#[derive(Clone, Debug)]
pub enum RingOp {
    AllReduce { values: Vec<f32>, bf16: bool },
    Broadcast { len: usize, root: usize },
    AllGather { mine: Vec<u8> },
}

/// What a [`RingOp`] ended with.
#[derive(Debug)]
pub enum RingResult {
    AllReduce(Vec<f32>),
    Broadcast(Vec<u8>),
    AllGather(Vec<Vec<u8>>),
}

/// Rank `rank` of a TCP ring of `world` ranks runs `op` as its first operation (sequence
/// number 1) while both its neighbours are played by a peer that sends `from_left` on the left
/// connection and then closes it, and reads whatever arrives on the right one. With `mac`,
/// every message carries a tag under [`FUZZ_KEY`] ([`message_tag`]), as in training. `None`
/// when the loopback connections cannot be set up.
pub fn ring_with_scripted_peer(
    rank: usize,
    world: usize,
    piece_floats: usize,
    op: RingOp,
    mac: bool,
    from_left: &[u8],
) -> Option<Result<RingResult, CollectiveError>> {
    let world = world.max(2);
    let rank = rank % world;
    let timeout = Duration::from_secs(5);
    let (left, left_peer) = loopback_pair()?;
    let (right, right_peer) = loopback_pair()?;
    for s in [&left, &right] {
        wire::configure_data_socket(s, timeout).ok()?;
    }
    let script = from_left.to_vec();
    let peer = std::thread::spawn(move || {
        let (mut l, mut r) = (left_peer, right_peer);
        let _ = l.write_all(&script);
        let _ = l.shutdown(Shutdown::Write);
        let _ = r.set_read_timeout(Some(timeout));
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        discard(l);
        discard(r);
    });
    let key = mac.then_some(FUZZ_KEY);
    let mut ring = TcpRing::new(
        rank,
        world,
        (left, MessageMac::new(key)),
        (right, MessageMac::new(key)),
        timeout,
        piece_floats,
    );
    let result = match op {
        RingOp::AllReduce { mut values, bf16 } => {
            let wire = if bf16 {
                wire::Wire::Bf16
            } else {
                wire::Wire::F32
            };
            ring.all_reduce_f32(&mut values, wire)
                .map(|()| RingResult::AllReduce(values))
        }
        RingOp::Broadcast { len, root } => {
            let mut buf = vec![0u8; len];
            ring.broadcast(&mut buf, root % world)
                .map(|()| RingResult::Broadcast(buf))
        }
        RingOp::AllGather { mine } => ring.all_gather(&mine).map(RingResult::AllGather),
    };
    ring.shutdown();
    drop(ring);
    let _ = peer.join();
    Some(result)
}
