//! GPT (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training"):
//! a post-LayerNorm decoder with learned positions, GELU and the LM head tied to the token
//! embedding.
//!
//! Parameter names and layouts are those of `transformers`' `OpenAIGPTLMHeadModel`
//! (`transformer.tokens_embed`, `transformer.h.N.attn.c_attn`, Conv1D weights [in, out]) and
//! `Config` mirrors `OpenAIGPTConfig`, so checkpoints move both ways. Unlike GPT-2 the
//! LayerNorm comes after each residual sum and there is no final LayerNorm.

use super::layers::{embedding, Activation, Conv1D, LayerNorm};
use super::packing::Packing;
use super::params::ParamStore;
use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The fields of `transformers`' `OpenAIGPTConfig` that define the network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// `gelu` here is the tanh approximation, as in the original code and `transformers`.
    #[serde(default = "default_afn")]
    pub afn: String,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attn_pdrop: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_afn() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}

/// Named sizes: (name, layers, width, heads, context). `base` is the paper's 12 × 768 with
/// 12 heads and a 512-token context; the small ones match GPT-2's names.
const SIZES: &[(&str, i64, i64, i64, i64)] = &[
    ("tiny", 2, 128, 4, 256),
    ("mini", 4, 256, 4, 256),
    ("small", 6, 384, 6, 256),
    ("base", 12, 768, 12, 512),
    ("medium", 24, 1024, 16, 512),
    ("large", 36, 1280, 20, 512),
];

/// `OpenAIGPTModel`'s activations (its own table, where `gelu` means the tanh form).
fn activation(afn: &str) -> Option<Activation> {
    match afn {
        "gelu" => Some(Activation::GeluTanh),
        "relu" => Some(Activation::Relu),
        _ => None,
    }
}

impl Config {
    /// A named size for a given vocabulary; dropout off, as for GPT-2 (see there).
    pub fn sized(size: &str, vocab_size: i64) -> Result<Self> {
        let &(_, n_layer, n_embd, n_head, n_positions) = SIZES
            .iter()
            .find(|s| s.0 == size)
            .ok_or_else(|| EngineError::UnknownSize {
                family: "gpt",
                size: size.to_string(),
                known: SIZES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "),
            })?;
        Ok(Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            afn: default_afn(),
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            layer_norm_epsilon: default_eps(),
            initializer_range: default_init_range(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        })
    }

    pub fn validate(&self) -> Result<()> {
        super::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ])?;
        super::check_heads("n_head", self.n_embd, self.n_head)?;
        super::check_dropout(&[
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ])?;
        if activation(&self.afn).is_none() {
            return Err(EngineError::Config {
                field: "afn".into(),
                message: format!("`{}` is not supported (gelu, relu)", self.afn),
            });
        }
        Ok(())
    }

    /// `config.json` as `transformers` writes it for `OpenAIGPTLMHeadModel`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_config_json(self, "OpenAIGPTLMHeadModel", "openai-gpt", [])
    }

    /// Training FLOPs per token (6N + 12·L·d·T, N without the embeddings).
    pub fn flops_per_token(&self, seq_len: i64, params_non_embedding: i64) -> f64 {
        (6 * params_non_embedding + 12 * self.n_layer * self.n_embd * seq_len) as f64
    }
}

struct Block {
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_1: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    ln_2: LayerNorm,
}

pub struct Gpt {
    pub config: Config,
    tokens_embed: Tensor,
    positions_embed: Tensor,
    blocks: Vec<Block>,
    activation: Activation,
}

impl Gpt {
    /// Builds the model with GPT's initialisation: N(0, 0.02) weights and embeddings, zero
    /// biases, unit LayerNorm gains (`transformers`' `_init_weights` for this model).
    pub fn new(ps: &mut ParamStore, config: &Config) -> Result<Self> {
        config.validate()?;
        let c = config;
        let std = c.initializer_range;
        let (d, eps) = (c.n_embd, c.layer_norm_epsilon);
        let tokens_embed = embedding(ps, "transformer.tokens_embed.weight", c.vocab_size, d, std);
        let positions_embed = embedding(
            ps,
            "transformer.positions_embed.weight",
            c.n_positions,
            d,
            std,
        );
        let blocks = (0..c.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                Block {
                    c_attn: Conv1D::new(ps, &format!("{p}.attn.c_attn"), d, 3 * d, std),
                    attn_proj: Conv1D::new(ps, &format!("{p}.attn.c_proj"), d, d, std),
                    ln_1: LayerNorm::new(ps, &format!("{p}.ln_1"), d, eps),
                    c_fc: Conv1D::new(ps, &format!("{p}.mlp.c_fc"), d, 4 * d, std),
                    mlp_proj: Conv1D::new(ps, &format!("{p}.mlp.c_proj"), 4 * d, d, std),
                    ln_2: LayerNorm::new(ps, &format!("{p}.ln_2"), d, eps),
                }
            })
            .collect();
        Ok(Gpt {
            activation: activation(&c.afn).expect("validated"),
            config: c.clone(),
            tokens_embed,
            positions_embed,
            blocks,
        })
    }

    /// Parameters that are not embeddings (for FLOP accounting).
    pub fn non_embedding_params(&self, ps: &ParamStore) -> i64 {
        ps.num_elements() - self.tokens_embed.numel() as i64 - self.positions_embed.numel() as i64
    }

    /// Hidden states [batch, time, n_embd] of the last block for token ids [batch, time].
    /// With an `attention_mask` (1 real, 0 padding after the text), the position-wise layers
    /// run on the real tokens only ([`Packing`]) and padding positions come back as zeros.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let c = &self.config;
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, time]");
        let packing = attention_mask.map_or(Packing::full(b, t), Packing::new);
        let ids = packing.pack(input_ids);
        let positions = packing.positions(input_ids.device());
        // [tokens, n_embd] from here on, except inside attention.
        let mut x = (Tensor::embedding(&self.tokens_embed, &ids, -1, false, false)
            + Tensor::embedding(&self.positions_embed, &positions, -1, false, false))
        .dropout(c.embd_pdrop, train);
        let (h, hd) = (c.n_head, c.n_embd / c.n_head);
        let attn_p = if train { c.attn_pdrop } else { 0.0 };
        for blk in &self.blocks {
            let qkv = packing.unpack(&blk.c_attn.forward(&x));
            let heads = qkv.reshape([b, t, 3, h, hd]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (heads.get(0), heads.get(1), heads.get(2));
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                attn_p,
                true,
                None,
                false,
            );
            let a = packing.pack(&a.transpose(1, 2).reshape([b, t, c.n_embd]));
            // Post-LN: normalise each residual sum.
            let a = blk.attn_proj.forward(&a).dropout(c.resid_pdrop, train);
            let n = blk.ln_1.forward(&(x + a));
            let m = blk
                .mlp_proj
                .forward(&self.activation.apply(&blk.c_fc.forward(&n)))
                .dropout(c.resid_pdrop, train);
            x = blk.ln_2.forward(&(n + m));
        }
        packing.unpack(&x)
    }

    /// Logits [batch, time, vocab] through the head tied to the token embedding.
    pub fn logits(&self, input_ids: &Tensor) -> Tensor {
        self.hidden_states(input_ids, None, false)
            .matmul(&self.tokens_embed.tr())
    }

    /// Sum of next-token cross-entropy over every position (targets [batch, time]).
    pub fn lm_loss_sum(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        let logits = self
            .hidden_states(input_ids, None, train)
            .matmul(&self.tokens_embed.tr());
        super::token_cross_entropy_sum(&logits, targets)
    }

    pub fn device(&self) -> tch::Device {
        self.tokens_embed.device()
    }
}
