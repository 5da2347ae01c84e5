//! Collectives over the ranks of one generation: the `Collective` trait the training loop is
//! written against, and `RingAllReduce`, the CPU implementation (a TCP ring like Gloo's,
//! with a shared-memory path for ranks on one host).
//!
//! Every operation either completes on all ranks or fails with a `CollectiveError` within
//! the group's timeout; after a failure the group is unusable (`Broken`) and the worker goes
//! back to rendezvous.

pub mod bench;
mod error;
/// For the fuzz targets in `fuzz/` only: not an API.
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod message_mac;
pub mod nccl;
mod ring;
mod segments;
mod shm;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_on_the_path;
mod wire;
mod write_mode;

pub use error::CollectiveError;
pub use wire::Wire;

use message_mac::MessageMac;
use ring::TcpRing;
use shm::ShmRing;
use std::net::{IpAddr, TcpListener};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The most bytes one rank may contribute to an all-gather. All-gathers carry small
/// metadata (transport choices, segment names, timings, sequence digests); a peer announcing
/// more is refused before anything is allocated for it.
pub const MAX_ALL_GATHER_BLOCK_BYTES: usize = 16 << 20;

/// Everything the data plane of one generation needs; comes from the coordinator's
/// Rendezvous reply.
#[derive(Clone)]
pub struct GroupSpec {
    pub rank: usize,
    pub world_size: usize,
    /// Data-plane "host:port" of every rank, index = rank.
    pub peers: Vec<String>,
    pub generation: u64,
    pub job_token: String,
    /// Longest wait for a peer: connecting, or any step of an operation.
    pub timeout: Duration,
    /// Every TCP ring message carries a MAC keyed from its handshake, so a host on the path
    /// cannot alter gradients or weights ([`message_mac`]). Always on in training; the
    /// all-reduce benchmark turns it off to show what it costs. Every rank must agree.
    pub message_mac: bool,
}

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// What carries the data: "local" (a world of one), "tcp", "shm" or "nccl".
    fn transport(&self) -> &'static str;
    /// In-place sum over all ranks of a contiguous float32 tensor (CPU for ring).
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError>;
    /// [`all_reduce_sum`](Self::all_reduce_sum) with the data carried as bfloat16, half the
    /// bytes: partial sums are added in float32, and every rank ends with the same sums,
    /// rounded to bfloat16. Alone, a rank's tensor is left as it is.
    fn all_reduce_sum_bf16(&mut self, t: &mut Tensor) -> Result<(), CollectiveError>;
    /// Copy root's tensor into every rank's tensor (same shape/dtype everywhere; any dtype).
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// Every rank contributes bytes (lengths may differ); returns all ranks' bytes, index = rank.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// For the all-reduce overlapped with backward (`ferry_dp::overlap`): what a
    /// gradient hook calls right after enqueueing a bucket's copy, when this collective runs
    /// its sums on a device stream of its own and must wait for exactly that work (NCCL).
    /// None, the default, for host collectives: a bucket is complete when the hook returns.
    fn stream_marker(&self) -> Option<Arc<dyn StreamMarker>> {
        None
    }
    /// [`all_reduce_sum`](Self::all_reduce_sum) of a tensor whose producing work ends at
    /// `mark` (from this collective's [`stream_marker`](Self::stream_marker)). A device
    /// collective sums on its side stream once the mark is reached, so the kernels queued
    /// after it (the rest of backward) keep running meanwhile; any dtype that
    /// `all_reduce_sum` takes. The default ignores the mark.
    fn all_reduce_sum_after(
        &mut self,
        t: &mut Tensor,
        _mark: &StreamMark,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_sum(t)
    }
}

/// Marks points in a device's stream of work; shared with the autograd threads that run the
/// gradient hooks.
pub trait StreamMarker: Send + Sync {
    /// A mark after everything the calling thread has enqueued so far.
    fn mark(&self) -> Result<StreamMark, CollectiveError>;
}

/// A point in a device's stream of work (for NCCL, a CUDA event recorded on the stream the
/// gradients are made on), as a [`StreamMarker`] made it; only that collective reads it.
pub struct StreamMark(Box<dyn std::any::Any + Send>);

impl StreamMark {
    pub fn new<T: std::any::Any + Send>(point: T) -> Self {
        StreamMark(Box::new(point))
    }

    /// The marker's own representation, when it is a `T`.
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

/// How ring ranks exchange all-reduce data. Broadcast, barrier and all-gather always use TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Shared memory when every peer is on this host, else TCP.
    #[default]
    Auto,
    /// The TCP ring, wherever the peers are.
    Tcp,
    /// Shared memory; connecting fails if some rank cannot map the segment.
    Shm,
}

impl Transport {
    /// Environment variable read by `RingAllReduce::connect`: auto, tcp or shm.
    pub const ENV: &'static str = "FERRY_RING_TRANSPORT";

    pub fn from_env() -> Result<Self, CollectiveError> {
        match std::env::var(Self::ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(Transport::Auto),
        }
    }

    fn code(self) -> u8 {
        match self {
            Transport::Auto => 0,
            Transport::Tcp => 1,
            Transport::Shm => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        [Transport::Auto, Transport::Tcp, Transport::Shm]
            .into_iter()
            .find(|t| t.code() == c)
    }
}

impl FromStr for Transport {
    type Err = CollectiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Transport::Auto),
            "tcp" => Ok(Transport::Tcp),
            "shm" => Ok(Transport::Shm),
            other => Err(CollectiveError::InvalidArgument(format!(
                "{}: `{other}` is not one of auto, tcp, shm",
                Transport::ENV
            ))),
        }
    }
}

/// Sizes that trade pipelining against per-piece overhead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// Floats per pipelined piece: per TCP write, and per rank in a shared-memory chunk.
    pub piece_floats: usize,
    /// Floats per rank slot of the shared-memory segment, a ring of chunk buffers.
    pub shm_slot_floats: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            // 256 KiB: a few pieces in flight fit in L2.
            piece_floats: 64 << 10,
            // 4 MiB per rank: the slots stay in the last-level cache. Measured on 2 ranks,
            // 256 MiB: ~9.5 GB/s busbw with 4 MiB slots against ~5.5 GB/s with 32 MiB ones.
            shm_slot_floats: 1 << 20,
        }
    }
}

/// The connections of a group of two or more ranks.
struct Links {
    tcp: TcpRing,
    shm: Option<ShmRing>,
}

impl Links {
    /// Makes every peer's pending and future operations fail at once.
    fn abandon(&self) {
        if let Some(shm) = &self.shm {
            shm.abort();
        }
        self.tcp.shutdown();
    }
}

/// Ring collective over TCP, or shared memory between ranks of one host.
pub struct RingAllReduce {
    rank: usize,
    world_size: usize,
    /// None when the world is this rank alone.
    links: Option<Links>,
    broken: bool,
}

impl RingAllReduce {
    /// `listener` is the worker's long-lived data-plane listener (bound once per process,
    /// reused across generations). The transport comes from `FERRY_RING_TRANSPORT`.
    pub fn connect(listener: &TcpListener, spec: &GroupSpec) -> Result<Self, CollectiveError> {
        Self::connect_with(listener, spec, Transport::from_env()?)
    }

    pub fn connect_with(
        listener: &TcpListener,
        spec: &GroupSpec,
        transport: Transport,
    ) -> Result<Self, CollectiveError> {
        Self::connect_tuned(listener, spec, transport, Tuning::default())
    }

    pub(crate) fn connect_tuned(
        listener: &TcpListener,
        spec: &GroupSpec,
        transport: Transport,
        tuning: Tuning,
    ) -> Result<Self, CollectiveError> {
        validate(spec)?;
        let (rank, world) = (spec.rank, spec.world_size);
        if world == 1 {
            return Ok(RingAllReduce {
                rank,
                world_size: world,
                links: None,
                broken: false,
            });
        }
        let deadline = Instant::now() + spec.timeout;
        let right = (rank + 1) % world;
        let left = (rank + world - 1) % world;
        // Every rank connects right while accepting from the left, so connect runs on a
        // helper thread; it stops retrying once accepting has failed.
        let cancel = AtomicBool::new(false);
        let (left_conn, right_conn) = std::thread::scope(|scope| {
            let connecting = scope.spawn(|| handshake::connect(spec, right, deadline, &cancel));
            let accepted = handshake::accept(listener, spec, left, deadline);
            if accepted.is_err() {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let connected = connecting.join().unwrap_or_else(|_| {
                Err(CollectiveError::Handshake {
                    peer: right,
                    reason: "connecting thread panicked".into(),
                })
            });
            (accepted, connected)
        });
        let (left_conn, left_key) = left_conn?;
        let (right_conn, right_key) = right_conn?;
        let left_conn = handshake::into_data_socket(left_conn, left, spec.timeout)?;
        let right_conn = handshake::into_data_socket(right_conn, right, spec.timeout)?;
        let mut tcp = TcpRing::new(
            rank,
            world,
            (left_conn, MessageMac::new(left_key)),
            (right_conn, MessageMac::new(right_key)),
            spec.timeout,
            tuning.piece_floats,
        );
        let shm = match negotiate_shm(&mut tcp, spec, transport, tuning) {
            Ok(shm) => shm,
            Err(e) => {
                tcp.shutdown();
                return Err(e);
            }
        };
        Ok(RingAllReduce {
            rank,
            world_size: world,
            links: Some(Links { tcp, shm }),
            broken: false,
        })
    }

    /// "local" (world of one), "tcp" or "shm".
    pub fn transport(&self) -> &'static str {
        match &self.links {
            None => "local",
            Some(Links { shm: Some(_), .. }) => "shm",
            Some(_) => "tcp",
        }
    }

    pub fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum_wire(buf, Wire::F32)
    }

    /// `wire` chooses what crosses the TCP ring. Shared memory moves no bytes over a link, so
    /// it sums in float32 and, for bfloat16, rounds the result as the ring would leave it.
    pub fn all_reduce_sum_wire(
        &mut self,
        buf: &mut [f32],
        wire: Wire,
    ) -> Result<(), CollectiveError> {
        self.on_links((), |l| match &mut l.shm {
            Some(shm) => {
                shm.all_reduce(buf, &l.tcp)?;
                if wire == Wire::Bf16 {
                    for x in buf.iter_mut() {
                        *x = wire::from_bf16(wire::to_bf16(*x));
                    }
                }
                Ok(())
            }
            None => l.tcp.all_reduce_f32(buf, wire),
        })
    }

    pub fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} outside world of {}",
                self.world_size
            )));
        }
        self.on_links((), |l| l.tcp.broadcast(buf, root))
    }

    /// Runs `op` on the links (or returns `single` when alone); any failure breaks the group
    /// and tells the peers.
    fn on_links<T>(
        &mut self,
        single: T,
        op: impl FnOnce(&mut Links) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        if self.broken {
            return Err(CollectiveError::Broken);
        }
        let Some(links) = self.links.as_mut() else {
            return Ok(single);
        };
        let result = op(links);
        if result.is_err() {
            self.broken = true;
            links.abandon();
        }
        result
    }
}

impl Drop for RingAllReduce {
    fn drop(&mut self) {
        if let Some(links) = &self.links {
            links.abandon();
        }
    }
}

impl Collective for RingAllReduce {
    fn rank(&self) -> usize {
        self.rank
    }

    fn transport(&self) -> &'static str {
        RingAllReduce::transport(self)
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.all_reduce_sum_wire(cpu_floats(t, "all_reduce_sum")?, Wire::F32)
    }

    fn all_reduce_sum_bf16(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.all_reduce_sum_wire(cpu_floats(t, "all_reduce_sum_bf16")?, Wire::Bf16)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let bytes = cpu_tensor_bytes(t, None, "broadcast")?;
        self.broadcast_bytes(bytes, root)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // Nobody can have everyone's (empty) block before everyone has arrived.
        self.all_gather(&[]).map(|_| ())
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.on_links(vec![mine.to_vec()], |l| l.tcp.all_gather(mine))
    }
}

fn validate(spec: &GroupSpec) -> Result<(), CollectiveError> {
    let bad = |m: String| Err(CollectiveError::InvalidArgument(m));
    if spec.world_size == 0 || spec.world_size > u32::MAX as usize {
        return bad(format!("world size {}", spec.world_size));
    }
    if spec.rank >= spec.world_size {
        return bad(format!(
            "rank {} outside world of {}",
            spec.rank, spec.world_size
        ));
    }
    if spec.peers.len() != spec.world_size {
        return bad(format!(
            "{} peer addresses for a world of {}",
            spec.peers.len(),
            spec.world_size
        ));
    }
    if spec.timeout.is_zero() {
        return bad("timeout must be positive".into());
    }
    Ok(())
}

/// A contiguous float32 CPU tensor's elements.
fn cpu_floats<'a>(t: &'a mut Tensor, op: &str) -> Result<&'a mut [f32], CollectiveError> {
    let bytes = cpu_tensor_bytes(t, Some(Kind::Float), op)?;
    let len = bytes.len() / 4;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a contiguous float32 tensor's data, 4-byte aligned, borrowed mutably.
    Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), len) })
}

/// The tensor's bytes, if it is a contiguous CPU tensor (of `kind`, when given).
fn cpu_tensor_bytes<'a>(
    t: &'a mut Tensor,
    kind: Option<Kind>,
    op: &str,
) -> Result<&'a mut [u8], CollectiveError> {
    let bad = |m: String| Err(CollectiveError::InvalidArgument(format!("{op}: {m}")));
    if t.device() != Device::Cpu {
        return bad(format!(
            "the ring collective needs CPU tensors, got {:?}",
            t.device()
        ));
    }
    let actual = t
        .f_kind()
        .map_err(|e| CollectiveError::InvalidArgument(format!("{op}: {e}")))?;
    if let Some(k) = kind {
        if actual != k {
            return bad(format!("needs a {k:?} tensor, got {actual:?}"));
        }
    }
    if !t.is_contiguous() {
        return bad("needs a contiguous tensor".into());
    }
    let len = t.numel() * actual.elt_size_in_bytes();
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a contiguous CPU tensor owns `len` bytes at data_ptr; the borrow of `t` keeps
    // them alive and unaliased for the slice's lifetime.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u8>(), len) })
}

/// True when every peer address is on this host: all loopback, or all the same host name.
fn all_on_one_host(peers: &[String]) -> bool {
    let host = |a: &str| {
        let h = a.rsplit_once(':').map_or(a, |(h, _)| h);
        h.trim_start_matches('[').trim_end_matches(']').to_string()
    };
    let loopback =
        |h: &str| h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let hosts: Vec<String> = peers.iter().map(|p| host(p)).collect();
    hosts.iter().all(|h| loopback(h)) || hosts.windows(2).all(|w| w[0] == w[1])
}

/// Agrees on the all-reduce transport over the authenticated ring and, for shared memory,
/// sets the segment up: every rank states its preference (an explicit `tcp` anywhere
/// vetoes); rank 0 creates the segment and sends its name; every rank maps it and reports;
/// rank 0 unlinks it. A failed mapping falls back to TCP unless some rank demanded `shm`.
fn negotiate_shm(
    tcp: &mut TcpRing,
    spec: &GroupSpec,
    transport: Transport,
    tuning: Tuning,
) -> Result<Option<ShmRing>, CollectiveError> {
    let prefs = tcp.all_gather(&[transport.code()])?;
    let mut wanted = Vec::with_capacity(prefs.len());
    for (rank, p) in prefs.iter().enumerate() {
        match p.as_slice() {
            [c] => match Transport::from_code(*c) {
                Some(t) => wanted.push(t),
                None => return Err(bad_negotiation(rank, "unknown transport code")),
            },
            _ => return Err(bad_negotiation(rank, "malformed transport preference")),
        }
    }
    let demanded = wanted.contains(&Transport::Shm);
    if wanted.contains(&Transport::Tcp) {
        if demanded {
            return Err(CollectiveError::InvalidArgument(format!(
                "ranks disagree on {}: some want tcp, some shm",
                Transport::ENV
            )));
        }
        return Ok(None);
    }
    if !demanded && !all_on_one_host(&spec.peers) {
        return Ok(None);
    }

    let (n, rank) = (spec.world_size, spec.rank);
    let (mut guard, mut mine) = (None, Err(String::new()));
    let mut announcement = Vec::new();
    if rank == 0 {
        let suffix: String = handshake::random_nonce()
            .map_err(|e| CollectiveError::io("random segment name", e))?[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = format!("ferry-ring-g{}-{suffix}", spec.generation);
        match ShmRing::create(
            &name,
            n,
            tuning.shm_slot_floats,
            tuning.piece_floats,
            spec.timeout,
        ) {
            Ok((file, ring)) => {
                announcement = file.path().to_string_lossy().into_owned().into_bytes();
                guard = Some(file);
                mine = Ok(ring);
            }
            Err(e) => {
                mine = Err(format!(
                    "rank 0 cannot create a segment in {}: {e}",
                    shm::SHM_DIR
                ))
            }
        }
    }
    let announced = tcp.all_gather(&announcement)?;
    let path = String::from_utf8_lossy(&announced[0]).into_owned();
    if rank != 0 && !path.is_empty() {
        mine = ShmRing::open(path.as_ref(), rank, n, spec.timeout)
            .map_err(|e| format!("rank {rank} cannot map {path}: {e}"));
    }
    let report = match &mine {
        Ok(_) => Vec::new(),
        Err(reason) if reason.is_empty() => b"no segment was announced".to_vec(),
        Err(reason) => reason.clone().into_bytes(),
    };
    let reports = tcp.all_gather(&report)?;
    drop(guard); // everyone has mapped it or given up: unlink
    let failures: Vec<String> = reports
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    match mine {
        Ok(ring) if failures.is_empty() => Ok(Some(ring)),
        _ if demanded => Err(CollectiveError::Io {
            context: "shared-memory transport".into(),
            source: std::io::Error::other(failures.join("; ")),
        }),
        _ => Ok(None),
    }
}

fn bad_negotiation(peer: usize, reason: &str) -> CollectiveError {
    CollectiveError::Protocol {
        peer,
        op: "transport negotiation",
        reason: reason.into(),
    }
}
