//! The worker's HTTP endpoint: Prometheus text on `/metrics`, liveness on `/healthz` and
//! readiness on `/readyz`, for Kubernetes probes and Prometheus scrapes.
//!
//! The training loop is synchronous and keeps its thread busy; the worker's tokio runtime
//! answers scrapes and probes on its own thread meanwhile. There is one worker per process and
//! the Prometheus recorder is process-wide, so the health state is process-wide too: the loop
//! reports through free functions ([`beat`], [`joined`], [`enter_generation`],
//! [`record_step`]) and nothing has to be threaded through the training code.
//!
//! - `/healthz` is 200 while the loop keeps reporting (every rendezvous poll, every step) and
//!   503 once it has been silent for longer than the stall timeout: the process is up but its
//!   loop is wedged, which only a restart cures.
//! - `/readyz` is 200 once the worker has joined the coordinator, 503 before.

use axum::{extract::State, http::header, http::StatusCode, response::IntoResponse};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--metrics-listen {addr}: cannot bind: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// "host:port" of the HTTP endpoint; port 0 picks a free one. `None`: no endpoint.
    pub listen: Option<String>,
    /// `/healthz` fails once the training loop has not reported for this long.
    pub stall_timeout: Duration,
}

/// Histogram buckets (seconds) for step and all-reduce times: milliseconds on small CPU jobs
/// up to minutes for large models.
const BUCKETS_S: &[f64] = &[
    0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0,
];

/// Starts the endpoint on `rt` and returns the address it is bound to (with port 0 the one
/// the OS picked). Also installs the process's metrics recorder.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    opts: &TelemetryOptions,
) -> Result<Option<SocketAddr>, TelemetryError> {
    HEALTH.set_stall_timeout(opts.stall_timeout);
    beat();
    let Some(addr) = opts.listen.as_deref() else {
        return Ok(None);
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| TelemetryError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS_S)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    describe();
    ::metrics::gauge!("ferry_worker_ready").set(0.0);
    // Histograms keep raw samples until rendered; drain them when nobody scrapes.
    let upkeep = handle.clone();
    rt.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let router = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(handle);
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            eprintln!("error: worker metrics endpoint stopped: {e}");
        }
    });
    eprintln!("worker: metrics on http://{local}/metrics, probes on /healthz and /readyz");
    Ok(Some(local))
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "ferry_worker_ready",
        "1 once the worker has joined the coordinator"
    );
    describe_gauge!(
        "ferry_worker_generation",
        "membership generation of the current group"
    );
    describe_gauge!("ferry_worker_rank", "this worker's rank in its generation");
    describe_gauge!(
        "ferry_worker_world_size",
        "ranks in this worker's generation"
    );
    describe_gauge!(
        "ferry_worker_committed_step",
        "steps applied to this worker's weights (the last committed step + 1)"
    );
    describe_gauge!(
        "ferry_worker_loss",
        "training loss of the last step (all ranks)"
    );
    describe_gauge!(
        "ferry_worker_tokens_per_second",
        "tokens of the global batch per second of the last step"
    );
    describe_gauge!(
        "ferry_worker_last_step_seconds",
        Unit::Seconds,
        "wall time of the last step: forward, backward, all-reduce and update"
    );
    describe_gauge!(
        "ferry_worker_last_allreduce_seconds",
        Unit::Seconds,
        "time the last step's gradient all-reduce took"
    );
    describe_gauge!(
        "ferry_worker_allreduce_bandwidth_bytes_per_second",
        "gradient bytes reduced / all-reduce seconds of the last step (algorithm bandwidth; 0 alone)"
    );
    describe_gauge!(
        "ferry_worker_mfu",
        "model FLOPs utilisation of the group: achieved / (peak per device x world size)"
    );
    describe_histogram!(
        "ferry_worker_step_seconds",
        Unit::Seconds,
        "wall time per step"
    );
    describe_histogram!(
        "ferry_worker_allreduce_seconds",
        Unit::Seconds,
        "gradient all-reduce time per step"
    );
    describe_counter!("ferry_worker_steps_total", "steps this worker applied");
    describe_counter!(
        "ferry_worker_tokens_total",
        "tokens of the global batches of the steps this worker applied"
    );
    describe_counter!(
        "ferry_worker_allreduce_bytes_total",
        Unit::Bytes,
        "gradient bytes this worker all-reduced"
    );
}

/// The training loop is alive: called on every rendezvous poll and every step.
pub fn beat() {
    HEALTH.beat(HEALTH.now_ms());
}

/// Joined the coordinator: `/readyz` turns 200.
pub fn joined(worker_id: &str, job_id: &str) {
    HEALTH.joined.store(true, Ordering::SeqCst);
    beat();
    ::metrics::gauge!("ferry_worker_ready").set(1.0);
    ::metrics::gauge!(
        "ferry_worker_info",
        "worker_id" => worker_id.to_string(),
        "job_id" => job_id.to_string()
    )
    .set(1.0);
}

/// A new group formed with this worker in it.
pub fn enter_generation(generation: u64, rank: u32, world_size: u32) {
    beat();
    ::metrics::gauge!("ferry_worker_generation").set(generation as f64);
    ::metrics::gauge!("ferry_worker_rank").set(f64::from(rank));
    ::metrics::gauge!("ferry_worker_world_size").set(f64::from(world_size));
}

/// What one committed step cost; every rank reports the same global loss and token count.
#[derive(Clone, Debug)]
pub struct StepSample {
    /// Steps applied after this one (the step's index + 1).
    pub committed_step: u64,
    pub loss: f64,
    pub tokens: u64,
    pub step_s: f64,
    pub allreduce_s: f64,
    /// Bytes this rank's all-reduce summed (0 alone: nothing to reduce).
    pub allreduce_bytes: u64,
    pub flops_per_token: f64,
    pub peak_gflops: f64,
    pub world_size: u32,
}

pub fn record_step(s: &StepSample) {
    beat();
    let tokens_per_s = per_second(s.tokens as f64, s.step_s);
    ::metrics::gauge!("ferry_worker_committed_step").set(s.committed_step as f64);
    ::metrics::gauge!("ferry_worker_loss").set(s.loss);
    ::metrics::gauge!("ferry_worker_tokens_per_second").set(tokens_per_s);
    ::metrics::gauge!("ferry_worker_last_step_seconds").set(s.step_s);
    ::metrics::gauge!("ferry_worker_last_allreduce_seconds").set(s.allreduce_s);
    ::metrics::gauge!("ferry_worker_allreduce_bandwidth_bytes_per_second")
        .set(per_second(s.allreduce_bytes as f64, s.allreduce_s));
    ::metrics::gauge!("ferry_worker_mfu").set(model_flops_utilization(
        s.flops_per_token,
        tokens_per_s,
        s.peak_gflops,
        s.world_size,
    ));
    ::metrics::histogram!("ferry_worker_step_seconds").record(s.step_s);
    ::metrics::histogram!("ferry_worker_allreduce_seconds").record(s.allreduce_s);
    ::metrics::counter!("ferry_worker_steps_total").increment(1);
    ::metrics::counter!("ferry_worker_tokens_total").increment(s.tokens);
    ::metrics::counter!("ferry_worker_allreduce_bytes_total").increment(s.allreduce_bytes);
}

/// MFU of a group of `world_size` equal devices: model FLOPs per second achieved over the
/// group's peak. `tokens_per_s` is the group's throughput (global batch tokens per step time).
pub fn model_flops_utilization(
    flops_per_token: f64,
    tokens_per_s: f64,
    peak_gflops: f64,
    world_size: u32,
) -> f64 {
    flops_per_token * tokens_per_s / 1e9 / (peak_gflops * f64::from(world_size.max(1)))
}

fn per_second(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        amount / seconds
    } else {
        0.0
    }
}

async fn metrics_text(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    let now = HEALTH.now_ms();
    match HEALTH.stalled_for(now) {
        None => (
            StatusCode::OK,
            format!(
                "ok: the training loop reported {:.1} s ago\n",
                HEALTH.silent_ms(now) as f64 / 1e3
            ),
        ),
        Some(silent) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the training loop has not reported for {:.0} s (limit {:.0} s)\n",
                silent.as_secs_f64(),
                HEALTH.stall_timeout().as_secs_f64()
            ),
        ),
    }
}

async fn readyz() -> impl IntoResponse {
    if HEALTH.joined.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready: joined the coordinator\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not joined the coordinator yet\n",
        )
    }
}

/// Liveness and readiness, on a millisecond clock that starts with the process.
struct Health {
    last_beat_ms: AtomicU64,
    stall_timeout_ms: AtomicU64,
    joined: AtomicBool,
    epoch: OnceLock<Instant>,
}

static HEALTH: Health = Health::new();

impl Health {
    const fn new() -> Health {
        Health {
            last_beat_ms: AtomicU64::new(0),
            stall_timeout_ms: AtomicU64::new(u64::MAX),
            joined: AtomicBool::new(false),
            epoch: OnceLock::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    fn set_stall_timeout(&self, d: Duration) {
        self.stall_timeout_ms.store(
            d.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::SeqCst,
        );
    }

    fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms.load(Ordering::SeqCst))
    }

    fn beat(&self, now_ms: u64) {
        self.last_beat_ms.fetch_max(now_ms, Ordering::SeqCst);
    }

    fn silent_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_beat_ms.load(Ordering::SeqCst))
    }

    /// How long the loop has been silent, when that is longer than the stall timeout.
    fn stalled_for(&self, now_ms: u64) -> Option<Duration> {
        let silent = self.silent_ms(now_ms);
        (silent > self.stall_timeout_ms.load(Ordering::SeqCst))
            .then(|| Duration::from_millis(silent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_only_after_the_loop_is_silent_past_the_timeout() {
        let h = Health::new();
        h.set_stall_timeout(Duration::from_secs(10));
        h.beat(1_000);
        assert_eq!(h.stalled_for(5_000), None);
        assert_eq!(
            h.stalled_for(11_000),
            None,
            "exactly the limit is still alive"
        );
        assert_eq!(h.stalled_for(11_001), Some(Duration::from_millis(10_001)));
        h.beat(11_500);
        assert_eq!(h.stalled_for(12_000), None, "a beat revives it");
        // Beats from a stale clock reading never move the last beat back.
        h.beat(2_000);
        assert_eq!(h.silent_ms(12_000), 500);
    }

    #[test]
    fn mfu_and_bandwidth_are_per_device_and_never_divide_by_zero() {
        // 1 GFLOP/token at 50 tokens/s on two 100-GFLOP/s devices: 25 %.
        let mfu = model_flops_utilization(1e9, 50.0, 100.0, 2);
        assert!((mfu - 0.25).abs() < 1e-12, "{mfu}");
        assert_eq!(model_flops_utilization(1e9, 50.0, 100.0, 0), 0.5);
        assert_eq!(per_second(1e6, 0.0), 0.0);
        assert_eq!(per_second(1e6, 0.5), 2e6);
    }
}
