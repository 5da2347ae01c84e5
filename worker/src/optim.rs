//! AdamW (Loshchilov & Hutter), written out in tensor ops so its state can be checkpointed
//! and restored bit for bit; tch's wrapped C++ optimizers do not expose their state.
//! The update is PyTorch's single-tensor AdamW, its default on CPU.

use crate::error::{EngineError, Result};
use crate::models::ParamStore;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    steps: i64,
}

impl AdamW {
    /// Weight decay applies to matrices and embeddings only, never to biases or LayerNorm
    /// weights (every 1-D parameter).
    pub fn new(ps: &ParamStore, config: AdamWConfig) -> Self {
        AdamW::for_params(ps.named(), config)
    }

    /// An optimizer over some of a store's parameters (fine-tuning gives each layer group
    /// its own, with its own learning rate and step count, created when the group thaws).
    pub fn for_params(params: &[(String, Tensor)], config: AdamWConfig) -> Self {
        let slots = params
            .iter()
            .map(|(name, p)| Slot {
                name: name.clone(),
                param: p.shallow_clone(),
                exp_avg: p.zeros_like(),
                exp_avg_sq: p.zeros_like(),
                decay: p.dim() >= 2,
            })
            .collect();
        AdamW {
            config,
            slots,
            steps: 0,
        }
    }

    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Sets the step count (bias corrections depend on it) after state arrives from elsewhere.
    pub fn set_steps(&mut self, steps: i64) {
        self.steps = steps;
    }

    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.steps as i32)).sqrt();
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = s.param.shallow_clone();
                if s.decay && c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = s.exp_avg.lerp_(&g, 1.0 - c.beta1);
                let _ = s.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = s.exp_avg_sq.addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt);
                let _ = denom.g_add_scalar_(c.eps);
                let _ = p.addcdiv_(&(&s.exp_avg * (-lr / bias1)), &denom);
            }
        });
    }

    /// The moment estimates, named `exp_avg.<param>` and `exp_avg_sq.<param>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: i64,
        path: &Path,
    ) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                for (key, dst) in [
                    ("exp_avg", &mut s.exp_avg),
                    ("exp_avg_sq", &mut s.exp_avg_sq),
                ] {
                    let name = format!("{key}.{}", s.name);
                    let src = tensors.get(&name).ok_or_else(|| {
                        EngineError::file(path, format!("optimizer state {name} is missing"))
                    })?;
                    if src.size() != dst.size() {
                        return Err(EngineError::file(
                            path,
                            format!("optimizer state {name}: shape mismatch"),
                        ));
                    }
                    dst.f_copy_(&src.to_device(dst.device()))?;
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (as torch.nn.utils.clip_grad_norm_ does).
pub fn clip_grad_norm(ps: &ParamStore, max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = ps
            .named()
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
        total
    })
}
