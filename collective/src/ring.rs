//! The TCP ring: rank r sends to its right neighbour r+1 and receives from its left
//! neighbour r-1, each over its own connection, with blocking sockets whose timeouts turn a
//! dead or wedged neighbour into an error. Every message (operation header, piece, block)
//! carries a MAC keyed from its connection's handshake ([`MessageMac`]).

use super::message_mac::MessageMac;
use super::segments::{ring_sub, Segments};
use super::wire::{
    f32_bytes, f32_bytes_mut, from_bf16, hung_up, to_bf16, u16_bytes, u16_bytes_mut, OpHeader,
    OpKind, Wire, HEADER_BYTES,
};
use super::{CollectiveError, MAX_ALL_GATHER_BLOCK_BYTES};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) struct TcpRing {
    rank: usize,
    world: usize,
    /// Connection we receive on, from rank - 1, and the MAC of its messages.
    left: TcpStream,
    left_mac: MessageMac,
    /// Connection we send on, to rank + 1, and the MAC of its messages.
    right: TcpStream,
    right_mac: MessageMac,
    timeout: Duration,
    piece_floats: usize,
    /// Operations so far; carried in every header so ranks out of step fail fast.
    seq: u64,
    /// Receive buffer for one piece of a partial sum.
    scratch: Vec<f32>,
}

impl TcpRing {
    pub(crate) fn new(
        rank: usize,
        world: usize,
        (left, left_mac): (TcpStream, MessageMac),
        (right, right_mac): (TcpStream, MessageMac),
        timeout: Duration,
        piece_floats: usize,
    ) -> Self {
        TcpRing {
            rank,
            world,
            left,
            left_mac,
            right,
            right_mac,
            timeout,
            piece_floats: piece_floats.max(1),
            seq: 0,
            scratch: Vec::new(),
        }
    }

    fn left_rank(&self) -> usize {
        ring_sub(self.rank, 1, self.world)
    }

    fn right_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn header(&mut self, kind: OpKind, detail: u32, len: usize) -> OpHeader {
        self.seq += 1;
        OpHeader {
            kind,
            seq: self.seq,
            detail,
            len: len as u64,
        }
    }

    /// Sends one message to the right neighbour.
    fn send(&self, bytes: &[u8], op: &'static str) -> Result<(), CollectiveError> {
        self.right_mac
            .send(&self.right, bytes)
            .map_err(|e| CollectiveError::from_socket(e, self.right_rank(), op))
    }

    /// Receives one message of exactly `buf.len()` bytes from the left neighbour.
    fn receive(&self, buf: &mut [u8], op: &'static str) -> Result<(), CollectiveError> {
        self.left_mac.receive(&self.left, buf, self.left_rank(), op)
    }

    fn send_header(&self, h: &OpHeader) -> Result<(), CollectiveError> {
        self.send(&h.encode(), h.kind.name())
    }

    /// Receives the left neighbour's header and checks it against `ours`.
    fn receive_header(&self, ours: &OpHeader, exact: bool) -> Result<OpHeader, CollectiveError> {
        let mut b = [0u8; HEADER_BYTES];
        self.receive(&mut b, ours.kind.name())?;
        ours.check(&b, self.left_rank(), exact)
    }

    /// The neighbour whose connection is closed or reset, if any.
    pub(crate) fn hung_up_peer(&self) -> Option<usize> {
        if hung_up(&self.left) {
            Some(self.left_rank())
        } else if hung_up(&self.right) {
            Some(self.right_rank())
        } else {
            None
        }
    }

    /// Closes both connections: the neighbours' pending operations fail at once instead of
    /// waiting for their timeouts, and our own blocked reads and writes return.
    pub(crate) fn shutdown(&self) {
        let _ = self.left.shutdown(Shutdown::Both);
        let _ = self.right.shutdown(Shutdown::Both);
    }

    /// Ring all-reduce: n-1 reduce-scatter steps, then n-1 all-gather steps. At step k rank r
    /// sends one segment to the right while receiving another from the left; a sender
    /// thread and this thread work through the steps piece by piece, the sender forwarding
    /// piece i of step k as soon as this thread has received (and summed) piece i of step
    /// k-1. Segment c's sum is formed in ring order starting at rank c and copied
    /// everywhere, so all ranks end bit-identical.
    ///
    /// With `wire` = [`Wire::Bf16`] every piece travels as bfloat16 (half the bytes): partial
    /// sums are rounded to bfloat16 when sent and added in float32 when received, and each
    /// segment's owner rounds its final sum to bfloat16 before sending it around, so every rank
    /// ends with the same bfloat16-valued sums.
    pub(crate) fn all_reduce_f32(
        &mut self,
        buf: &mut [f32],
        wire: Wire,
    ) -> Result<(), CollectiveError> {
        let header = self.header(OpKind::AllReduce, wire as u32, std::mem::size_of_val(buf));
        let (n, r) = (self.world, self.rank);
        let seg = Segments::new(buf.len(), n, self.piece_floats);
        let per_step = seg.pieces_per_segment;
        let reduce_steps = n - 1;
        let steps = 2 * reduce_steps;
        // Segment sent / received at step k.
        let sent_at = |k: usize| {
            if k < reduce_steps {
                ring_sub(r, k, n)
            } else {
                ring_sub(r + 1, k - reduce_steps, n)
            }
        };
        let received_at = |k: usize| {
            if k < reduce_steps {
                ring_sub(r, k + 1, n)
            } else {
                ring_sub(r, k - reduce_steps, n)
            }
        };
        let data = SharedSlice::new(buf);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(self.piece_floats, 0.0);
        // bfloat16 pieces: encoded by the sender, decoded by the receiver.
        let mut outgoing = vec![
            0u16;
            if wire == Wire::Bf16 {
                self.piece_floats
            } else {
                0
            }
        ];
        let mut incoming16 = outgoing.clone();
        let (left_rank, right_rank) = (self.left_rank(), self.right_rank());
        let op = OpKind::AllReduce.name();

        let result = self.pipelined(
            |p: &Pipeline| {
                self.send_header(&header)?;
                for k in 0..steps {
                    for i in 0..per_step {
                        if k > 0 {
                            let needed = (k - 1) * per_step + i + 1;
                            p.wait(|s| s.received >= needed, left_rank, op)?;
                        }
                        let range = seg.piece(sent_at(k), i);
                        // SAFETY: the receiver finished writing this range (waited above)
                        // and does not write it again before we report it sent.
                        let piece = unsafe { data.get(range) };
                        let bytes = match wire {
                            Wire::F32 => f32_bytes(piece),
                            Wire::Bf16 => {
                                let out = &mut outgoing[..piece.len()];
                                for (o, &x) in out.iter_mut().zip(piece) {
                                    *o = to_bf16(x);
                                }
                                u16_bytes(out)
                            }
                        };
                        self.send(bytes, op)?;
                        p.advance(|s| s.sent += 1);
                    }
                }
                Ok(())
            },
            |p: &Pipeline| {
                self.receive_header(&header, true)?;
                for k in 0..steps {
                    for i in 0..per_step {
                        let range = seg.piece(received_at(k), i);
                        let incoming = &mut scratch[..range.len()];
                        let read = |into: &mut [f32], halves: &mut [u16]| match wire {
                            Wire::F32 => self.receive(f32_bytes_mut(into), op),
                            Wire::Bf16 => {
                                let halves = &mut halves[..into.len()];
                                self.receive(u16_bytes_mut(halves), op)?;
                                for (x, &h) in into.iter_mut().zip(halves.iter()) {
                                    *x = from_bf16(h);
                                }
                                Ok(())
                            }
                        };
                        if k < reduce_steps {
                            read(incoming, &mut incoming16)?;
                            // SAFETY: the sender reads this range only at a later step,
                            // after we report it received.
                            let acc = unsafe { data.get_mut(range) };
                            for (a, b) in acc.iter_mut().zip(incoming.iter()) {
                                *a += *b;
                            }
                            if wire == Wire::Bf16 && k + 1 == reduce_steps {
                                // This rank owns the segment's final sum: round it as the
                                // others will receive it.
                                for a in acc.iter_mut() {
                                    *a = from_bf16(to_bf16(*a));
                                }
                            }
                        } else {
                            // The segment arriving at all-gather step s is the one we sent
                            // at reduce-scatter step s: wait until that piece is out.
                            let needed = (k - reduce_steps) * per_step + i + 1;
                            p.wait(|s| s.sent >= needed, right_rank, op)?;
                            // SAFETY: the sender is done with this range (waited above).
                            // A message that fails its MAC leaves bytes here, but the
                            // operation then fails and the buffer is not used.
                            let dst = unsafe { data.get_mut(range) };
                            read(dst, &mut incoming16)?;
                        }
                        p.advance(|s| s.received += 1);
                    }
                }
                Ok(())
            },
        );
        self.scratch = scratch;
        result
    }

    /// Pipelined chain from `root` around the ring: each rank receives a piece from the
    /// left and forwards it to the right, except the rank just before the root.
    pub(crate) fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        let header = self.header(OpKind::Broadcast, root as u32, buf.len());
        let op = OpKind::Broadcast.name();
        let hops = ring_sub(self.rank, root, self.world);
        let receives = hops > 0;
        let forwards = hops < self.world - 1;
        if receives {
            self.receive_header(&header, true)?;
        }
        if forwards {
            self.send_header(&header)?;
        }
        // Each hop checks a piece's MAC before forwarding it under its own link's key.
        for piece in buf.chunks_mut(self.piece_floats * 4) {
            if receives {
                self.receive(piece, op)?;
            }
            if forwards {
                self.send(piece, op)?;
            }
        }
        Ok(())
    }

    /// Ring all-gather of byte blocks of up to [`MAX_ALL_GATHER_BLOCK_BYTES`]: at step s rank
    /// r forwards the block of rank r-s (its own first) and receives the block of rank r-s-1.
    pub(crate) fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let seq = self.header(OpKind::AllGather, 0, 0).seq;
        let (n, r) = (self.world, self.rank);
        let left_rank = self.left_rank();
        let op = OpKind::AllGather.name();
        let header = |owner: usize, len: usize| OpHeader {
            kind: OpKind::AllGather,
            seq,
            detail: owner as u32,
            len: len as u64,
        };
        let blocks: Mutex<Vec<Arc<Vec<u8>>>> = Mutex::new(
            (0..n)
                .map(|owner| {
                    Arc::new(if owner == r {
                        mine.to_vec()
                    } else {
                        Vec::new()
                    })
                })
                .collect(),
        );

        self.pipelined(
            |p: &Pipeline| {
                for s in 0..n - 1 {
                    if s > 0 {
                        p.wait(|st| st.received >= s, left_rank, op)?;
                    }
                    let owner = ring_sub(r, s, n);
                    let block = Arc::clone(&lock(&blocks)[owner]);
                    if owner == r && block.len() > MAX_ALL_GATHER_BLOCK_BYTES {
                        // Failing the operation here closes the links, so the peers stop
                        // at once instead of waiting for a block that never comes.
                        return Err(CollectiveError::InvalidArgument(format!(
                            "{op}: a block of {} bytes is over the {MAX_ALL_GATHER_BLOCK_BYTES} \
                             bytes one rank may contribute",
                            block.len()
                        )));
                    }
                    self.send_header(&header(owner, block.len()))?;
                    self.send(&block, op)?;
                    p.advance(|st| st.sent += 1);
                }
                Ok(())
            },
            |p: &Pipeline| {
                for s in 0..n - 1 {
                    let owner = ring_sub(r, s + 1, n);
                    let got = self.receive_header(&header(owner, 0), false)?;
                    if got.detail as usize != owner {
                        return Err(CollectiveError::Protocol {
                            peer: left_rank,
                            op,
                            reason: format!(
                                "sent the block of rank {}, expected {owner}",
                                got.detail
                            ),
                        });
                    }
                    // The announced length is authenticated, but bounded all the same before
                    // anything is allocated: a peer may be buggy or compromised.
                    let len = usize::try_from(got.len)
                        .ok()
                        .filter(|&l| l <= MAX_ALL_GATHER_BLOCK_BYTES)
                        .ok_or_else(|| CollectiveError::Protocol {
                            peer: left_rank,
                            op,
                            reason: format!(
                                "announced a block of {} bytes, over the \
                                 {MAX_ALL_GATHER_BLOCK_BYTES} one rank may contribute",
                                got.len
                            ),
                        })?;
                    let mut block = vec![0u8; len];
                    self.receive(&mut block, op)?;
                    lock(&blocks)[owner] = Arc::new(block);
                    p.advance(|st| st.received += 1);
                }
                Ok(())
            },
        )?;
        let blocks = blocks.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(blocks
            .into_iter()
            .map(|b| Arc::try_unwrap(b).unwrap_or_else(|shared| shared.to_vec()))
            .collect())
    }

    /// Runs `send` on a helper thread and `recv` on this one. The first error wins; it shuts
    /// the connections down so the other side's blocking I/O returns at once.
    fn pipelined(
        &self,
        send: impl FnOnce(&Pipeline) -> Result<(), CollectiveError> + Send,
        recv: impl FnOnce(&Pipeline) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let pipeline = Pipeline::new(self.timeout);
        let fail = |e: CollectiveError| {
            if pipeline.fail(e) {
                self.shutdown();
            }
        };
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                if let Err(e) = send(&pipeline) {
                    fail(e);
                }
            });
            if let Err(e) = recv(&pipeline) {
                fail(e);
            }
            if sender.join().is_err() {
                fail(CollectiveError::Io {
                    context: "ring sender thread".into(),
                    source: std::io::Error::other("panicked"),
                });
            }
        });
        match pipeline
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .error
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Pieces handed over between the sender thread and the receiving thread of one operation.
#[derive(Default)]
struct Progress {
    sent: usize,
    received: usize,
    error: Option<CollectiveError>,
}

struct Pipeline {
    state: Mutex<Progress>,
    changed: Condvar,
    timeout: Duration,
}

impl Pipeline {
    fn new(timeout: Duration) -> Self {
        Pipeline {
            state: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            timeout,
        }
    }

    fn advance(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }

    /// Records the first error; true if this was it.
    fn fail(&self, e: CollectiveError) -> bool {
        let mut s = lock(&self.state);
        let first = s.error.is_none();
        if first {
            s.error = Some(e);
        }
        drop(s);
        self.changed.notify_all();
        first
    }

    /// Waits until `ready`; fails when the other side failed or nothing happened for the
    /// timeout (the other side is itself blocked on `peer`).
    fn wait(
        &self,
        ready: impl Fn(&Progress) -> bool,
        peer: usize,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let mut s = lock(&self.state);
        loop {
            if s.error.is_some() {
                return Err(CollectiveError::Aborted { op });
            }
            if ready(&s) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CollectiveError::Timeout { peer, op });
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer shared by the sender and receiver threads of one operation. They touch
/// disjoint ranges at any time; the `Pipeline` waits are what guarantee it.
#[derive(Clone, Copy)]
struct SharedSlice {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: see the type's comment; the pointer outlives the scoped threads using it.
unsafe impl Send for SharedSlice {}
unsafe impl Sync for SharedSlice {}

impl SharedSlice {
    fn new(buf: &mut [f32]) -> Self {
        SharedSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// # Safety
    /// No other thread writes `range` while the returned slice lives.
    unsafe fn get<'a>(&self, range: Range<usize>) -> &'a [f32] {
        debug_assert!(range.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(range.start), range.len())
    }

    /// # Safety
    /// No other thread reads or writes `range` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut<'a>(&self, range: Range<usize>) -> &'a mut [f32] {
        debug_assert!(range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}
