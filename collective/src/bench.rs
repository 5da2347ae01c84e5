//! All-reduce bandwidth, measured as shared/bench/allreduce_bench.py measures gloo: each
//! timed iteration refills the buffer (untimed), meets at a barrier, then times one in-place
//! all-reduce; an iteration's time is the max over ranks; the figure is the median over
//! iterations. algbw = bytes / time, busbw = 2(n-1)/n * bytes / time, GB = 1e9 bytes.

use super::{Collective, CollectiveError, GroupSpec, RingAllReduce, Transport};
use serde::Serialize;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct AllReduceBenchConfig {
    pub rank: usize,
    pub world: usize,
    /// "host:port" of every rank; this rank listens on its own entry.
    pub peers: Vec<String>,
    pub sizes_mib: Vec<usize>,
    pub transport: Transport,
    pub warmup: usize,
    pub max_iters: usize,
    /// Approximate time budget per size, which sets the iteration count.
    pub budget_s: f64,
    pub timeout: Duration,
    /// Every TCP ring message carries a MAC (see `GroupSpec::message_mac`).
    pub message_mac: bool,
}

/// One size's result; the fields of allreduce_bench.py plus the transport.
#[derive(Serialize, Debug)]
#[allow(non_snake_case)]
pub struct AllReduceBenchRecord {
    pub bench: &'static str,
    pub backend: &'static str,
    pub transport: &'static str,
    /// Whether TCP ring messages carried a MAC (shared memory sends none either way).
    pub message_mac: bool,
    pub world: usize,
    pub dtype: &'static str,
    pub mib: usize,
    pub bytes: usize,
    pub iters: usize,
    pub time_ms_median: f64,
    pub time_ms_min: f64,
    pub time_ms_max: f64,
    pub algbw_GBps: f64,
    pub busbw_GBps: f64,
    pub correct: bool,
}

#[derive(thiserror::Error, Debug)]
pub enum AllReduceBenchError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// Runs every size; calls `report` on rank 0 with each size's record as soon as it is done.
pub fn run_allreduce_bench(
    c: &AllReduceBenchConfig,
    mut report: impl FnMut(&AllReduceBenchRecord),
) -> Result<(), AllReduceBenchError> {
    if c.peers.len() != c.world || c.rank >= c.world {
        return Err(AllReduceBenchError::Config(format!(
            "rank {} of world {} with {} peer addresses",
            c.rank,
            c.world,
            c.peers.len()
        )));
    }
    // The same as gloo's run: one intra-op thread for the fill.
    tch::set_num_threads(1);
    let addr = &c.peers[c.rank];
    let listener = TcpListener::bind(addr).map_err(|source| AllReduceBenchError::Listen {
        addr: addr.clone(),
        source,
    })?;
    let spec = GroupSpec {
        rank: c.rank,
        world_size: c.world,
        peers: c.peers.clone(),
        generation: 1,
        job_token: "ferry-allreduce-bench".into(),
        timeout: c.timeout,
        message_mac: c.message_mac,
    };
    let mut ring = RingAllReduce::connect_with(&listener, &spec, c.transport)?;
    let expected = (c.world * (c.world + 1) / 2) as f32;
    let fill = (c.rank + 1) as f64;

    for &mib in &c.sizes_mib {
        let bytes = mib << 20;
        let mut buf = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
        for _ in 0..c.warmup {
            timed_all_reduce(&mut ring, &mut buf, fill)?;
        }
        // The iteration count from one probe, agreed across ranks (the slowest decides).
        let probe = timed_all_reduce(&mut ring, &mut buf, fill)?;
        let probe = max_over_ranks(&mut ring, &[probe])?[0];
        let iters = ((c.budget_s / probe.max(1e-6)) as usize).clamp(5, c.max_iters.max(5));

        let mut times = Vec::with_capacity(iters);
        let mut correct = true;
        for _ in 0..iters {
            times.push(timed_all_reduce(&mut ring, &mut buf, fill)?);
            correct &= ends_equal(&buf, expected);
        }
        correct &= all_equal(&buf, expected);
        let times = max_over_ranks(&mut ring, &times)?;
        let correct = all_ranks(&mut ring, correct)?;
        if c.rank == 0 {
            report(&record(c, ring.transport(), mib, bytes, &times, correct));
        }
    }
    Ok(())
}

fn timed_all_reduce(
    ring: &mut RingAllReduce,
    buf: &mut Tensor,
    fill: f64,
) -> Result<f64, CollectiveError> {
    let _ = buf.fill_(fill);
    ring.barrier()?;
    let t0 = Instant::now();
    ring.all_reduce_sum(buf)?;
    Ok(t0.elapsed().as_secs_f64())
}

fn record(
    c: &AllReduceBenchConfig,
    transport: &'static str,
    mib: usize,
    bytes: usize,
    times: &[f64],
    correct: bool,
) -> AllReduceBenchRecord {
    let med = median(times);
    let ms = |t: f64| (t * 1e6).round() / 1e3;
    let gbps = |x: f64| (x * 1e3).round() / 1e3;
    let algbw = bytes as f64 / med / 1e9;
    AllReduceBenchRecord {
        bench: "allreduce",
        backend: "ferry-ring",
        transport,
        message_mac: c.message_mac,
        world: c.world,
        dtype: "float32",
        mib,
        bytes,
        iters: times.len(),
        time_ms_median: ms(med),
        time_ms_min: ms(times.iter().copied().fold(f64::INFINITY, f64::min)),
        time_ms_max: ms(times.iter().copied().fold(0.0, f64::max)),
        algbw_GBps: gbps(algbw),
        busbw_GBps: gbps(2.0 * (c.world - 1) as f64 / c.world as f64 * algbw),
        correct,
    }
}

/// Python's statistics.median: the mean of the middle two for an even count.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Element-wise maximum over ranks.
fn max_over_ranks(ring: &mut RingAllReduce, mine: &[f64]) -> Result<Vec<f64>, CollectiveError> {
    let bytes: Vec<u8> = mine.iter().flat_map(|t| t.to_le_bytes()).collect();
    let mut out = mine.to_vec();
    for theirs in ring.all_gather(&bytes)? {
        for (o, chunk) in out.iter_mut().zip(theirs.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *o = o.max(f64::from_le_bytes(b));
        }
    }
    Ok(out)
}

fn all_ranks(ring: &mut RingAllReduce, ok: bool) -> Result<bool, CollectiveError> {
    Ok(ring.all_gather(&[ok as u8])?.iter().all(|b| b == &[1]))
}

fn as_floats(t: &Tensor) -> &[f32] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous float32 CPU tensor we allocated, borrowed for the slice's life.
    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<f32>(), n) }
}

fn ends_equal(t: &Tensor, expected: f32) -> bool {
    let v = as_floats(t);
    v.first() == Some(&expected) && v.last() == Some(&expected)
}

fn all_equal(t: &Tensor, expected: f32) -> bool {
    as_floats(t).iter().all(|&x| x == expected)
}
