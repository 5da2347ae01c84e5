//! Sampling text from a causal language model: temperature, top-k and nucleus (top-p).

use crate::models::CausalLm;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = no limit).
    pub top_p: f64,
    pub seed: u64,
}

/// Continues `prompt` and returns only the new tokens; stops early at `stop_token`.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[i64],
    cfg: &SamplingConfig,
    stop_token: Option<i64>,
) -> Vec<i64> {
    tch::manual_seed(cfg.seed as i64 & i64::MAX);
    let device = model.device();
    let ctx = model.context() as usize;
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    tch::no_grad(|| {
        for _ in 0..cfg.max_new_tokens {
            let window = &tokens[tokens.len().saturating_sub(ctx)..];
            let input = Tensor::from_slice(window).unsqueeze(0).to_device(device);
            let logits = model
                .logits(&input)
                .get(0)
                .get(window.len() as i64 - 1)
                .to_kind(Kind::Float);
            let next = pick(&logits, cfg);
            tokens.push(next);
            out.push(next);
            if Some(next) == stop_token {
                break;
            }
        }
    });
    out
}

fn pick(logits: &Tensor, cfg: &SamplingConfig) -> i64 {
    if cfg.temperature <= 0.0 {
        return logits.argmax(0, false).int64_value(&[]);
    }
    let mut logits = logits / cfg.temperature;
    let vocab = logits.size()[0];
    if cfg.top_k > 0 && cfg.top_k < vocab {
        let (top, _) = logits.topk(cfg.top_k, 0, true, true);
        let kth = top.get(cfg.top_k - 1);
        logits = logits.where_self(&logits.ge_tensor(&kth), &Tensor::from(f64::NEG_INFINITY));
    }
    if cfg.top_p < 1.0 {
        let (sorted, order) = logits.sort(0, true);
        let cumulative = sorted.softmax(0, Kind::Float).cumsum(0, Kind::Float);
        // Drop a token when the tokens before it already reach p; the first always stays.
        let before = &cumulative - sorted.softmax(0, Kind::Float);
        let drop_sorted = before.ge(cfg.top_p);
        let drop = drop_sorted.scatter(0, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
        .softmax(0, Kind::Float)
        .multinomial(1, false)
        .int64_value(&[0])
}
