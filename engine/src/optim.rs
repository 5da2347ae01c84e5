//! AdamW (Loshchilov & Hutter), written out in tensor ops so its state can be checkpointed
//! and restored bit for bit; tch's wrapped C++ optimizers do not expose their state.
//! The update is libtorch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`), with
//! PyTorch's single-tensor update written out for tensors the kernel does not take.

use crate::error::{EngineError, Result};
use crate::models::ParamStore;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn ferry_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> i32;
}

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
        if !self.fused_step(lr) {
            self.single_tensor_step(lr);
        }
    }

    /// libtorch's fused AdamW over the parameters that have gradients, one call for those with
    /// weight decay and one for those without. Returns false, having changed nothing, when
    /// the tensors are not what the fused kernel takes (float32, contiguous, one device).
    fn fused_step(&mut self, lr: f64) -> bool {
        let c = self.config;
        let with_grad: Vec<(&Slot, Tensor)> = self
            .slots
            .iter()
            .map(|s| (s, s.param.grad()))
            .filter(|(_, g)| g.defined())
            .collect();
        let Some((first, _)) = with_grad.first() else {
            return true;
        };
        let device = first.param.device();
        let fits =
            |t: &Tensor| t.kind() == Kind::Float && t.is_contiguous() && t.device() == device;
        if !with_grad
            .iter()
            .all(|(s, g)| fits(&s.param) && fits(g) && fits(&s.exp_avg) && fits(&s.exp_avg_sq))
        {
            return false;
        }
        let step = Tensor::from(self.steps as f32).to_device(device);
        for decay in [true, false] {
            let group: Vec<&(&Slot, Tensor)> =
                with_grad.iter().filter(|(s, _)| s.decay == decay).collect();
            if group.is_empty() {
                continue;
            }
            // The kernel writes through these (the parameters and moments, in place).
            let ptrs = |f: &dyn Fn(&(&Slot, Tensor)) -> *const C_tensor| -> Vec<*mut c_void> {
                group.iter().map(|e| f(e) as *mut c_void).collect()
            };
            let params = ptrs(&|(s, _)| s.param.as_ptr());
            let grads = ptrs(&|(_, g)| g.as_ptr());
            let exp_avgs = ptrs(&|(s, _)| s.exp_avg.as_ptr());
            let exp_avg_sqs = ptrs(&|(s, _)| s.exp_avg_sq.as_ptr());
            let steps = ptrs(&|_| step.as_ptr());
            let weight_decay = if decay { c.weight_decay } else { 0.0 };
            // SAFETY: every pointer is a live tch tensor (an at::Tensor*) borrowed for this
            // call; the shim catches every exception.
            let rc = unsafe {
                ferry_fused_adamw(
                    params.as_ptr(),
                    grads.as_ptr(),
                    exp_avgs.as_ptr(),
                    exp_avg_sqs.as_ptr(),
                    steps.as_ptr(),
                    group.len() as i64,
                    lr,
                    c.beta1,
                    c.beta2,
                    weight_decay,
                    c.eps,
                )
            };
            // The kernel checks its inputs before it writes, and they were checked above.
            assert_eq!(
                rc, 0,
                "libtorch's fused AdamW refused tensors that passed its checks"
            );
        }
        true
    }

    /// PyTorch's single-tensor AdamW, written out in tensor ops: for what the fused kernel
    /// does not take, and as the reference the fused update is tested against.
    fn single_tensor_step(&mut self, lr: f64) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Two copies of the same parameters (a matrix with weight decay, a vector without), with
    /// the same gradients each step.
    fn twin_stores() -> (ParamStore, ParamStore) {
        tch::manual_seed(7);
        let mut a = ParamStore::new(Device::Cpu);
        let _ = a.normal("w", &[64, 48], 0.5);
        let _ = a.normal("b", &[48], 0.5);
        let mut b = ParamStore::new(Device::Cpu);
        for (name, t) in a.named() {
            let _ = b.register(name.clone(), t.detach().copy().set_requires_grad(true));
        }
        (a, b)
    }

    #[test]
    fn the_fused_update_matches_the_single_tensor_update() {
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (fused_ps, plain_ps) = twin_stores();
        let mut fused = AdamW::new(&fused_ps, config);
        let mut plain = AdamW::new(&plain_ps, config);
        let initial: Vec<Tensor> = plain_ps
            .named()
            .iter()
            .map(|(_, p)| p.detach().copy())
            .collect();
        for step in 0..5 {
            for ps in [&fused_ps, &plain_ps] {
                ps.zero_grad();
                let loss = ps
                    .named()
                    .iter()
                    .map(|(_, p)| (p * p * (step + 1) as f64).sum(Kind::Float))
                    .fold(Tensor::from(0f32), |acc, x| acc + x);
                loss.backward();
            }
            fused.steps += 1;
            assert!(
                fused.fused_step(1e-2),
                "the fused kernel took float32 CPU tensors"
            );
            plain.steps += 1;
            plain.single_tensor_step(1e-2);
        }
        for (((name, f), (_, p)), p0) in fused_ps.named().iter().zip(plain_ps.named()).zip(&initial)
        {
            let diff = (f - p).abs().max().double_value(&[]);
            assert!(
                diff < 1e-6,
                "{name}: fused and single-tensor differ by {diff}"
            );
            let moved = (f - p0).abs().max().double_value(&[]);
            assert!(moved > 1e-3, "{name} moved only {moved}");
        }
        for (a, b) in fused.state_tensors().iter().zip(plain.state_tensors()) {
            let diff = (&a.1 - &b.1).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{}: {diff}", a.0);
        }
    }
}
