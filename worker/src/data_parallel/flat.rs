//! Flat views of the model for collectives: gradients in buckets, the whole training state in
//! one buffer for the broadcast to joiners, and a bit-exact parameter checksum.

use crate::collective::{Collective, CollectiveError};
use crate::models::ParamStore;
use crate::optim::AdamW;
use ferry_common::job::GradientDtype;
use tch::{Device, Kind, Tensor};

/// Gradients are reduced in buckets of about this many bytes (DDP's default).
pub const BUCKET_BYTES: i64 = 25 * 1024 * 1024;

/// Sums every parameter's gradient over all ranks, bucket by bucket, together with `scalars`
/// (e.g. the step's partial loss). Returns the summed scalars. In float32 the scalars ride in
/// the last bucket; with bfloat16 gradients ([`GradientDtype::Bf16`]) they are summed on
/// their own in float32, so the loss keeps its precision.
pub fn all_reduce_grads(
    ps: &ParamStore,
    scalars: &[f64],
    dtype: GradientDtype,
    coll: &mut dyn Collective,
) -> Result<Vec<f64>, CollectiveError> {
    if coll.world_size() == 1 {
        // Nothing to sum with; skip the copies.
        return Ok(scalars.to_vec());
    }
    ensure_grads(ps);
    let params = ps.named();
    let mut start = 0;
    let mut out = Vec::new();
    while start < params.len() || (start == params.len() && out.is_empty()) {
        // Take parameters until the bucket is full (always at least one).
        let mut end = start;
        let mut bytes = 0;
        while end < params.len()
            && (end == start || bytes + 4 * params[end].1.numel() as i64 <= BUCKET_BYTES)
        {
            bytes += 4 * params[end].1.numel() as i64;
            end += 1;
        }
        let last = end == params.len();
        let scalars_here = last && dtype == GradientDtype::Fp32;
        let mut pieces: Vec<Tensor> = params[start..end]
            .iter()
            .map(|(_, p)| p.grad().to_kind(Kind::Float).reshape([-1]))
            .collect();
        if scalars_here {
            pieces.push(scalar_tensor(ps, scalars));
        }
        let mut flat = Tensor::cat(&pieces, 0);
        match dtype {
            GradientDtype::Fp32 => coll.all_reduce_sum(&mut flat)?,
            GradientDtype::Bf16 => coll.all_reduce_sum_bf16(&mut flat)?,
        }
        let mut offset = 0;
        tch::no_grad(|| {
            for (_, p) in &params[start..end] {
                let n = p.numel() as i64;
                let mut g = p.grad();
                g.copy_(&flat.narrow(0, offset, n).view_as(p));
                offset += n;
            }
        });
        if scalars_here {
            let tail = flat
                .narrow(0, offset, scalars.len() as i64)
                .to_kind(Kind::Double);
            out = Vec::<f64>::try_from(&tail).unwrap_or_default();
        } else if last {
            let mut own = scalar_tensor(ps, scalars);
            coll.all_reduce_sum(&mut own)?;
            out = Vec::<f64>::try_from(&own.to_kind(Kind::Double)).unwrap_or_default();
        }
        start = end;
        if last {
            break;
        }
    }
    Ok(out)
}

/// The scalars as one float32 tensor on the parameters' device.
fn scalar_tensor(ps: &ParamStore, scalars: &[f64]) -> Tensor {
    let device = ps.named().first().map_or(Device::Cpu, |(_, p)| p.device());
    let s: Vec<f32> = scalars.iter().map(|&v| v as f32).collect();
    Tensor::from_slice(&s).to_device(device)
}

/// Bytes that [`all_reduce_grads`] sums on a group of `world_size`: every gradient (4 bytes
/// each, 2 in bfloat16) and the scalars (4 bytes); nothing when the rank is alone.
pub fn all_reduce_bytes(
    ps: &ParamStore,
    scalars: usize,
    dtype: GradientDtype,
    world_size: usize,
) -> u64 {
    if world_size <= 1 {
        return 0;
    }
    let elements: i64 = ps.named().iter().map(|(_, p)| p.numel() as i64).sum();
    let per = match dtype {
        GradientDtype::Fp32 => 4,
        GradientDtype::Bf16 => 2,
    };
    per * elements as u64 + 4 * scalars as u64
}

/// Gives every parameter a gradient tensor (zeros where backward left none), so that the
/// reduced gradient has somewhere to go.
fn ensure_grads(ps: &ParamStore) {
    for (_, p) in ps.named() {
        if !p.grad().defined() {
            (p.sum(Kind::Float) * 0.0).backward();
        }
    }
}

/// Parameters, then AdamW's first and second moments, in one float32 buffer.
fn state_tensors(ps: &ParamStore, opt: &AdamW) -> Vec<Tensor> {
    let mut t: Vec<Tensor> = ps.named().iter().map(|(_, p)| p.shallow_clone()).collect();
    t.extend(opt.state_tensors().into_iter().map(|(_, t)| t));
    t
}

/// Makes every rank's weights and optimizer state rank `root`'s: one broadcast of one buffer.
pub fn broadcast_state(
    ps: &ParamStore,
    opt: &AdamW,
    root: usize,
    coll: &mut dyn Collective,
) -> Result<(), CollectiveError> {
    let tensors = state_tensors(ps, opt);
    let pieces: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.detach().to_kind(Kind::Float).reshape([-1]))
        .collect();
    let mut flat = Tensor::cat(&pieces, 0);
    coll.broadcast(&mut flat, root)?;
    let mut offset = 0;
    tch::no_grad(|| {
        for t in &tensors {
            let n = t.numel() as i64;
            let mut dst = t.shallow_clone();
            dst.copy_(&flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    });
    Ok(())
}

/// FNV-1a over the bits of every parameter: equal on two ranks only if their weights are
/// identical to the last bit.
pub fn parameter_checksum(ps: &ParamStore) -> u64 {
    let mut h = ferry_common::sampler::Fnv1a::new();
    for (_, p) in ps.named() {
        let v = Vec::<f32>::try_from(
            p.detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .reshape([-1]),
        )
        .unwrap_or_default();
        for x in v {
            h.write(&x.to_bits().to_le_bytes());
        }
    }
    h.finish()
}
