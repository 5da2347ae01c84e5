//! Flat views of the model for collectives: gradients in buckets, the whole training state in
//! one buffer for the broadcast to joiners, and a bit-exact parameter checksum.

use ferry_collective::{Collective, CollectiveError};
use ferry_engine::models::ParamStore;
use ferry_engine::optim::AdamW;
use ferry_spec::job::GradientDtype;
use tch::{Device, Kind, Tensor};

/// Parameters grouped for reduction, DDP's way: in reverse order of registration, which is
/// about the order backward finishes their gradients, at most `cluster.bucket_mib` of float32
/// each (always at least one parameter). Both the overlapped and the plain all-reduce use
/// these buckets in this order, so they sum every element in the same ring position and give
/// bit-identical results.
pub struct Buckets {
    /// Parameter indices (into `ParamStore::named`) of each bucket, in reduction order.
    pub members: Vec<Vec<usize>>,
}

impl Buckets {
    pub fn new(ps: &ParamStore, bucket_mib: f64) -> Buckets {
        let cap = (bucket_mib * 1024.0 * 1024.0) as i64;
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0;
        for (i, (_, p)) in ps.named().iter().enumerate().rev() {
            let size = 4 * p.numel() as i64;
            match members.last_mut() {
                Some(b) if bytes + size <= cap => {
                    b.push(i);
                    bytes += size;
                }
                _ => {
                    members.push(vec![i]);
                    bytes = size;
                }
            }
        }
        Buckets { members }
    }

    /// Bucket `b`'s gradients as one float32 vector.
    pub fn flatten(&self, ps: &ParamStore, b: usize) -> Tensor {
        let params = ps.named();
        let pieces: Vec<Tensor> = self.members[b]
            .iter()
            .map(|&i| params[i].1.grad().to_kind(Kind::Float).reshape([-1]))
            .collect();
        Tensor::cat(&pieces, 0)
    }

    /// Writes bucket `b`'s reduced vector back into its parameters' gradients.
    pub fn unflatten(&self, ps: &ParamStore, b: usize, flat: &Tensor) {
        let params = ps.named();
        let mut offset = 0;
        tch::no_grad(|| {
            for &i in &self.members[b] {
                let p = &params[i].1;
                let n = p.numel() as i64;
                let mut g = p.grad();
                g.copy_(&flat.narrow(0, offset, n).view_as(p));
                offset += n;
            }
        });
    }
}

/// Sums one bucket in place, carried as `dtype`.
pub(super) fn reduce_bucket(
    flat: &mut Tensor,
    dtype: GradientDtype,
    coll: &mut dyn Collective,
) -> Result<(), CollectiveError> {
    match dtype {
        GradientDtype::Fp32 => coll.all_reduce_sum(flat),
        GradientDtype::Bf16 => coll.all_reduce_sum_bf16(flat),
    }
}

/// Sums every parameter's gradient over all ranks, bucket by bucket ([`Buckets`]), then
/// `scalars` (e.g. the step's partial loss) on their own in float32. Returns the summed
/// scalars. [`super::overlap`] does the same work while backward runs.
pub fn all_reduce_grads(
    ps: &ParamStore,
    buckets: &Buckets,
    scalars: &[f64],
    dtype: GradientDtype,
    coll: &mut dyn Collective,
) -> Result<Vec<f64>, CollectiveError> {
    if coll.world_size() == 1 {
        // Nothing to sum with; skip the copies.
        return Ok(scalars.to_vec());
    }
    ensure_grads(ps);
    for b in 0..buckets.members.len() {
        let mut flat = buckets.flatten(ps, b);
        reduce_bucket(&mut flat, dtype, coll)?;
        buckets.unflatten(ps, b, &flat);
    }
    all_reduce_scalars(ps, scalars, coll)
}

/// Sums a few values over all ranks in float32.
pub(super) fn all_reduce_scalars(
    ps: &ParamStore,
    scalars: &[f64],
    coll: &mut dyn Collective,
) -> Result<Vec<f64>, CollectiveError> {
    let mut own = scalar_tensor(ps, scalars);
    coll.all_reduce_sum(&mut own)?;
    Ok(Vec::<f64>::try_from(&own.to_kind(Kind::Double)).unwrap_or_default())
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
pub(super) fn ensure_grads(ps: &ParamStore) {
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
    let mut h = ferry_spec::sampler::Fnv1a::new();
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
