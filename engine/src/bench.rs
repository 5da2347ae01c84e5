//! Training throughput on random tokens: the same measurement, fields and FLOP accounting as
//! `shared/bench/torch_gpt2_bench.py` (GPT-2) and `bench/torch_models_bench.py` (GPT, BERT),
//! so ferry and PyTorch print comparable JSON lines.

use crate::error::Result;
use crate::models::{Family, Model, ModelConfig, ParamStore};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::runtime;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct TrainBenchConfig {
    pub family: Family,
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
    pub model: &'static str,
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
    let (l, d, h, t) = (c.layers, c.d_model, c.heads, c.ctx);
    let shape: Vec<String> = match c.family {
        Family::Gpt2 | Family::Gpt => {
            vec![
                format!("n_layer={l}"),
                format!("n_embd={d}"),
                format!("n_head={h}"),
                format!("n_positions={t}"),
            ]
        }
        Family::Bert => vec![
            format!("num_hidden_layers={l}"),
            format!("hidden_size={d}"),
            format!("num_attention_heads={h}"),
            format!("intermediate_size={}", 4 * d),
            format!("max_position_embeddings={t}"),
        ],
    };
    let mc = ModelConfig::sized(c.family, "small", c.vocab)?.with_overrides(&shape)?;
    let mut ps = ParamStore::new(c.device);
    let model = Model::new(&mut ps, &mc)?;
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
        let loss = random_batch_loss(&model, c);
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
        model: c.family.name(),
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

/// The mean loss of one random batch. Causal models: next-token loss on uniform tokens. BERT:
/// 15% of positions masked (all to [MASK], id 4; the 80/10/10 split costs nothing) and random
/// next-sentence labels on [CLS]-less random pairs, segment 1 from the middle on; the MLM head
/// runs on the masked positions only, as in training.
fn random_batch_loss(model: &Model, c: &TrainBenchConfig) -> Tensor {
    let dev = c.device;
    match model {
        Model::Bert(bert) => {
            let ids = Tensor::randint_low(5, c.vocab, [c.batch, c.ctx], (Kind::Int64, dev));
            let chosen = Tensor::rand([c.batch, c.ctx], (Kind::Float, dev)).lt(0.15);
            let labels = ids.masked_fill(&chosen.logical_not(), -100);
            let inputs = ids.masked_fill(&chosen, 4);
            let types = Tensor::arange(c.ctx, (Kind::Int64, dev))
                .ge(c.ctx / 2)
                .to_kind(Kind::Int64)
                .expand([c.batch, c.ctx], false);
            let mask = Tensor::ones([c.batch, c.ctx], (Kind::Int64, dev));
            let nsp = Tensor::randint(2, [c.batch], (Kind::Int64, dev));
            let inputs = crate::models::bert::BertInputs {
                input_ids: &inputs,
                token_type_ids: &types,
                attention_mask: &mask,
            };
            let sums = bert.pretraining_sums(&inputs, &labels, &nsp, true);
            sums.mlm_loss / (sums.mlm_count.max(1) as f64) + sums.nsp_loss / c.batch as f64
        }
        _ => {
            let lm = model.as_causal().expect("causal");
            let data = Tensor::randint(c.vocab, [c.batch, c.ctx + 1], (Kind::Int64, dev));
            let (x, y) = (data.narrow(1, 0, c.ctx), data.narrow(1, 1, c.ctx));
            lm.lm_loss_sum(&x, &y, true) / (c.batch * c.ctx) as f64
        }
    }
}
