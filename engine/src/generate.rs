//! Sampling text from a causal language model: temperature, top-k and nucleus (top-p).

use crate::models::CausalLm;
use crate::pretrained;
use anyhow::{bail, Result};
use ferry_dataset::tokenizer::TokenizerKind;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// The stop token is not produced before this many new tokens.
    #[serde(default)]
    pub min_new_tokens: usize,
    /// 0 means greedy decoding, and so does any temperature below [`GREEDY_BELOW`].
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = no limit).
    pub top_p: f64,
    pub seed: u64,
    /// Token ids never produced, whatever their probability (`transformers`' `bad_words_ids`
    /// for single tokens): the unknown token, which stands for no word in particular.
    #[serde(default)]
    pub suppress: Vec<i64>,
}

/// `ferry generate`: loads the model directory `model_dir` (a causal LM and its tokenizer)
/// and continues `prompt`; returns the new text. The tokenizer's unknown token is added to
/// `sampling.suppress`: a sample made of `<unk>` reads as nothing.
pub fn continue_text(
    model_dir: &Path,
    prompt: &str,
    mut sampling: SamplingConfig,
    device: tch::Device,
) -> Result<String> {
    if !(sampling.temperature.is_finite() && sampling.temperature >= 0.0) {
        bail!(
            "--temperature {}: must be a finite number >= 0 (0 = greedy)",
            sampling.temperature
        );
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        bail!(
            "--top-p {}: must be in (0, 1] (1 = no limit)",
            sampling.top_p
        );
    }
    let loaded = pretrained::load_model(model_dir, device)?;
    let Some(lm) = loaded.model.as_causal() else {
        bail!(
            "{}: a {} model does not generate text; use a gpt2 or gpt model",
            loaded.dir.display(),
            loaded.config.family().name()
        );
    };
    let tok_path = loaded.dir.join("tokenizer.json");
    let tokenizer = pretrained::load_tokenizer_for(&loaded.dir, &loaded.config)?;
    let enc = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("{}: cannot encode the prompt: {e}", tok_path.display()))?;
    let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    let eos = lm.eos_token_id();
    if ids.is_empty() {
        ids.push(eos.unwrap_or(0));
    }
    if let Some(unk) = tokenizer.token_to_id(TokenizerKind::of(&tokenizer).unknown_token()) {
        sampling.suppress.push(i64::from(unk));
    }
    let new = generate(lm, &ids, &sampling, eos);
    let new: Vec<u32> = new
        .iter()
        .filter(|&&t| Some(t) != eos)
        .map(|&t| t as u32)
        .collect();
    // Special tokens are kept, so that one sampled despite `suppress` would show.
    tokenizer
        .decode(&new, false)
        .map_err(|e| anyhow::anyhow!("{}: cannot decode: {e}", tok_path.display()))
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
            // Before min_new_tokens the stop token is suppressed too.
            let too_early = stop_token.filter(|_| out.len() < cfg.min_new_tokens);
            let next = pick(&logits, cfg, too_early);
            tokens.push(next);
            out.push(next);
            if Some(next) == stop_token {
                break;
            }
        }
    });
    out
}

/// Temperatures below this (and NaN) decode greedily, as 0 does: dividing the logits by a
/// smaller one overflows (to inf, then NaN probabilities), and a temperature this small
/// already puts all the probability on the most likely token.
pub const GREEDY_BELOW: f64 = 1e-4;

/// One token from the logits. Never panics on odd settings: a tiny or NaN temperature is
/// greedy, an infinite one uniform, the most likely token always stays in the nucleus
/// (whatever `top_p`), and if nothing is left to sample the choice is greedy. `also` is
/// suppressed with `cfg.suppress`.
fn pick(logits: &Tensor, cfg: &SamplingConfig, also: Option<i64>) -> i64 {
    let vocab = logits.size()[0];
    let suppress: Vec<i64> = cfg
        .suppress
        .iter()
        .copied()
        .chain(also)
        .filter(|&id| (0..vocab).contains(&id))
        .collect();
    let logits = if suppress.is_empty() {
        logits.shallow_clone()
    } else {
        let ids = Tensor::from_slice(&suppress).to_device(logits.device());
        logits.index_fill(0, &ids, f64::NEG_INFINITY)
    };
    let greedy = || logits.argmax(0, false).int64_value(&[]);
    if cfg.temperature.is_nan() || cfg.temperature < GREEDY_BELOW {
        return greedy();
    }
    // In float64, scaled logits stay finite; tokens already at -inf stay there (not the NaN
    // that -inf / inf would give).
    let excluded = logits.isneginf();
    let mut logits =
        (logits.to_kind(Kind::Double) / cfg.temperature).masked_fill(&excluded, f64::NEG_INFINITY);
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
        let _ = drop_sorted.get(0).fill_(0);
        let drop = drop_sorted.scatter(0, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let probs = logits.softmax(0, Kind::Double);
    // Nothing left to draw from (every token suppressed, NaN logits): multinomial would fail.
    if probs.isfinite().all().int64_value(&[]) == 0 {
        return greedy();
    }
    probs.multinomial(1, false).int64_value(&[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: i64, top_p: f64, suppress: Vec<i64>) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: 1,
            min_new_tokens: 0,
            temperature,
            top_k,
            top_p,
            seed: 3,
            suppress,
        }
    }

    /// A suppressed token is never picked, even as the most likely one: not greedily, not by
    /// sampling, not inside the top-k or the nucleus.
    #[test]
    fn a_suppressed_token_is_never_picked() {
        // Token 2 (think `<unk>`) dominates; 0, 1 and 3 share what is left.
        let logits = Tensor::from_slice(&[1.0f32, 1.0, 8.0, 0.5]);
        assert_eq!(pick(&logits, &sampling(0.0, 0, 1.0, vec![]), None), 2);
        assert_eq!(pick(&logits, &sampling(0.0, 0, 1.0, vec![2]), None), 0);
        // `also` (the stop token before --min-new-tokens) is suppressed the same way.
        assert_eq!(pick(&logits, &sampling(0.0, 0, 1.0, vec![]), Some(2)), 0);
        tch::manual_seed(11);
        for cfg in [
            sampling(1.0, 0, 1.0, vec![2]),
            sampling(1.5, 2, 1.0, vec![2]),
            sampling(1.0, 0, 0.9, vec![2]),
            // Ids outside the vocabulary are ignored rather than failing.
            sampling(1.0, 0, 1.0, vec![2, 99, -1]),
        ] {
            for _ in 0..300 {
                let next = pick(&logits, &cfg, None);
                assert!((0..4).contains(&next) && next != 2, "{next}");
            }
        }
        // Without suppression the same sampling does pick it: the test can fail.
        let free = sampling(1.0, 0, 1.0, vec![]);
        assert!((0..50).any(|_| pick(&logits, &free, None) == 2));
    }

    /// Settings that once made `multinomial` panic pick a token instead: a temperature so
    /// small that logits / temperature overflow (greedy), a NaN or infinite one, a nucleus of
    /// 0 (the most likely token stays), every token suppressed.
    #[test]
    fn odd_settings_pick_a_token_instead_of_panicking() {
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 8.0, 0.5]);
        tch::manual_seed(5);
        for (temperature, top_p) in [
            (1e-300, 1.0),
            (1e-5, 0.9),
            (1e-3, 1.0),
            (f64::NAN, 1.0),
            (1.0, 0.0),
        ] {
            for top_k in [0, 2] {
                let cfg = sampling(temperature, top_k, top_p, vec![]);
                assert_eq!(pick(&logits, &cfg, None), 2, "{cfg:?}");
            }
        }
        // Infinite temperature: uniform over the tokens not suppressed.
        let hot = sampling(f64::INFINITY, 0, 1.0, vec![2]);
        for _ in 0..100 {
            let next = pick(&logits, &hot, None);
            assert!([0, 1, 3].contains(&next), "{next}");
        }
        let nothing_left = sampling(1.0, 0, 0.5, vec![0, 1, 2, 3]);
        assert!((0..4).contains(&pick(&logits, &nothing_left, None)));
    }
}
