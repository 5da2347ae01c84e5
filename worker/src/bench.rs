//! Training throughput on random tokens: the same measurement, fields and FLOP accounting as
//! `shared/bench/torch_gpt2_bench.py`, so the two print comparable JSON lines.

use crate::error::Result;
use crate::models::{gpt2, ParamStore};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::runtime;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct TrainBenchConfig {
    pub layers: i64,
    pub d_model: i64,
    pub heads: i64,
    pub ctx: i64,
    pub batch: i64,
    pub vocab: i64,
    pub steps: usize,
    pub warmup_steps: usize,
    pub threads: usize,
    pub keep_freed_memory: bool,
    pub seed: u64,
    pub device: Device,
}

#[derive(Serialize, Debug)]
pub struct TrainBenchResult {
    pub r#impl: &'static str,
    pub world: usize,
    pub threads_per_rank: usize,
    pub layers: i64,
    pub d_model: i64,
    pub heads: i64,
    pub ctx: i64,
    pub batch_per_rank: i64,
    pub vocab: i64,
    pub dtype: &'static str,
    pub keep_freed_memory: bool,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub tokens_per_s_from_median: f64,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    pub params: i64,
    pub params_nonembedding: i64,
    pub model_flops_per_token: f64,
    pub peak_gflops: f64,
    pub mfu_vs_peak: f64,
    pub loss_first: f64,
    pub loss_last: f64,
}

pub fn run_train_bench(c: &TrainBenchConfig) -> Result<TrainBenchResult> {
    if c.keep_freed_memory {
        runtime::keep_freed_memory();
    }
    let threads = runtime::configure_threads(c.threads);
    tch::manual_seed(c.seed as i64);
    let mut mc = gpt2::Config::sized("small", c.vocab).expect("known size");
    (mc.n_layer, mc.n_embd, mc.n_head, mc.n_positions) = (c.layers, c.d_model, c.heads, c.ctx);
    let mut ps = ParamStore::new(c.device);
    let model = gpt2::Gpt2::new(&mut ps, &mc)?;
    let mut opt = AdamW::new(
        &ps,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    );
    let peak = runtime::matmul_gflops(c.device);
    let non_emb = model.non_embedding_params(&ps);
    let flops = mc.flops_per_token(c.ctx, non_emb);
    let tokens = (c.batch * c.ctx) as f64;

    let mut step = || {
        let data = Tensor::randint(c.vocab, [c.batch, c.ctx + 1], (Kind::Int64, c.device));
        let (x, y) = (data.narrow(1, 0, c.ctx), data.narrow(1, 1, c.ctx));
        let loss = model.lm_loss_sum(&x, &y, true) / tokens;
        loss.backward();
        clip_grad_norm(&ps, 1.0);
        opt.step(3e-4);
        ps.zero_grad();
        loss.double_value(&[])
    };
    let mut losses: Vec<f64> = (0..c.warmup_steps).map(|_| step()).collect();
    let mut times = Vec::with_capacity(c.steps);
    let start = Instant::now();
    for _ in 0..c.steps {
        let t0 = Instant::now();
        losses.push(step());
        times.push(t0.elapsed().as_secs_f64());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tps = tokens * c.steps as f64 / elapsed;
    Ok(TrainBenchResult {
        r#impl: "ferry",
        world: 1,
        threads_per_rank: threads,
        layers: c.layers,
        d_model: c.d_model,
        heads: c.heads,
        ctx: c.ctx,
        batch_per_rank: c.batch,
        vocab: c.vocab,
        dtype: "float32",
        keep_freed_memory: c.keep_freed_memory,
        steps: c.steps,
        tokens_per_s: tps,
        tokens_per_s_from_median: tokens / median,
        step_ms_median: median * 1e3,
        step_ms_min: sorted[0] * 1e3,
        step_ms_max: sorted[sorted.len() - 1] * 1e3,
        params: ps.num_elements(),
        params_nonembedding: non_emb,
        model_flops_per_token: flops,
        peak_gflops: peak,
        mfu_vs_peak: flops * tps / 1e9 / peak,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
    })
}
