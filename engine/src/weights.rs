//! Weights on disk in the safetensors format, under `transformers`' tensor names.

use crate::error::{EngineError, Result};
use crate::fsutil::write_atomic;
use crate::models::ParamStore;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes float32 tensors with the `{"format": "pt"}` metadata `transformers` expects.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let mut bytes = vec![0u8; t.numel() * 4];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        buffers.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| EngineError::file(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| EngineError::file(path, e))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file as float32 on the CPU.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| EngineError::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::U8 | Dtype::BOOL => continue, // masks and buffers, never parameters
            other => {
                return Err(EngineError::file(
                    path,
                    format!("tensor {name}: unsupported dtype {other:?}"),
                ))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.insert(
            name,
            if kind == Kind::Int64 {
                t
            } else {
                t.to_kind(Kind::Float)
            },
        );
    }
    Ok(out)
}

/// Copies tensors into the store's parameters by name. A name may also be found without the
/// `prefix` (`transformer.`, `bert.`): `transformers` base-model checkpoints omit it.
pub fn load_into(
    ps: &ParamStore,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    path: &Path,
) -> Result<()> {
    load_except(ps, tensors, prefix, path, |_| false).map(|_| ())
}

/// [`load_into`], except that parameters the file lacks and `may_stay_fresh` accepts keep
/// their initial values (a new classification head on a pretrained body). Returns their
/// names.
pub fn load_except(
    ps: &ParamStore,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    path: &Path,
    may_stay_fresh: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut fresh = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, param) in ps.named() {
            let found = tensors
                .get(name)
                .or_else(|| name.strip_prefix(prefix).and_then(|n| tensors.get(n)));
            let Some(src) = found else {
                if may_stay_fresh(name) {
                    fresh.push(name.clone());
                } else {
                    missing.push(name.clone());
                }
                continue;
            };
            if src.size() != param.size() {
                return Err(EngineError::file(
                    path,
                    format!(
                        "tensor {name}: shape {:?} in the file, the model expects {:?}",
                        src.size(),
                        param.size()
                    ),
                ));
            }
            param
                .shallow_clone()
                .f_copy_(&src.to_device(param.device()))?;
        }
        Ok(())
    })?;
    if !missing.is_empty() {
        let shown: Vec<_> = missing.iter().take(5).cloned().collect();
        return Err(EngineError::file(
            path,
            format!(
                "{} tensors missing, e.g. {}",
                missing.len(),
                shown.join(", ")
            ),
        ));
    }
    Ok(fresh)
}
