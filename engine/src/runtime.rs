//! Process-level setup for training: device choice, thread count, allocator behaviour, and
//! the matmul peak that MFU is measured against.

use crate::error::{EngineError, Result};
use tch::{Device, Kind, Tensor};

/// `auto` picks a GPU when libtorch sees one, else the CPU: GPU `LOCAL_RANK` (modulo the
/// visible count) when a launcher such as torchrun set it, else GPU 0. `CUDA_VISIBLE_DEVICES`
/// decides which GPUs libtorch sees (an empty value: none). `cpu`, `cuda` and `cuda:N` force.
pub fn select_device(spec: &str) -> Result<Device> {
    let cuda = || tch::Cuda::is_available();
    let visible = || {
        if cuda() {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        }
    };
    match spec {
        "auto" => auto_device(std::env::var("LOCAL_RANK").ok().as_deref(), visible()),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index: usize = s
                .strip_prefix("cuda:")
                .map(|i| i.parse())
                .transpose()
                .map_err(|_| EngineError::Config {
                    field: "device".into(),
                    message: format!("`{s}` is not cuda:N"),
                })?
                .unwrap_or(0);
            cuda_device(s, index, visible())
        }
        other => Err(EngineError::Config {
            field: "device".into(),
            message: format!("`{other}` is not one of auto, cpu, cuda, cuda:N"),
        }),
    }
}

/// `auto` with `visible` GPUs and the launcher's `LOCAL_RANK`, if any.
fn auto_device(local_rank: Option<&str>, visible: usize) -> Result<Device> {
    if visible == 0 {
        return Ok(Device::Cpu);
    }
    let index = match local_rank {
        None => 0,
        Some(r) => r.trim().parse::<usize>().map_err(|_| EngineError::Config {
            field: "LOCAL_RANK".into(),
            message: format!("`{r}` is not a process index (0, 1, ...)"),
        })?,
    };
    Ok(Device::Cuda(index % visible))
}

/// GPU `index` (asked for as `spec`) when libtorch sees `visible` GPUs: an error naming the
/// device and the count when there is no such GPU.
fn cuda_device(spec: &str, index: usize, visible: usize) -> Result<Device> {
    let message = match visible {
        0 => format!("`{spec}` requested, but no GPU is visible to libtorch"),
        n if index >= n => format!(
            "`{spec}` requested, but libtorch sees {n} GPU{} (cuda:0{})",
            if n == 1 { "" } else { "s" },
            if n == 1 {
                String::new()
            } else {
                format!(" to cuda:{}", n - 1)
            }
        ),
        _ => return Ok(Device::Cuda(index)),
    };
    Err(EngineError::Config {
        field: "device".into(),
        message,
    })
}

extern "C" {
    fn ferry_autocast_cuda_bf16() -> i32;
}

/// Mixed precision for a device: bf16 autocast on CUDA (float32 master weights, optimizer and
/// reductions), plain float32 on the CPU, where bf16 matmuls are not faster on these cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Float32,
    Bf16Autocast,
}

pub fn precision_for(device: Device) -> Result<Precision> {
    match device {
        Device::Cuda(_) => {
            // SAFETY: the shim only sets libtorch's autocast dtype and catches all exceptions.
            if unsafe { ferry_autocast_cuda_bf16() } != 0 {
                return Err(EngineError::Config {
                    field: "device".into(),
                    message: "could not select bf16 autocast".into(),
                });
            }
            Ok(Precision::Bf16Autocast)
        }
        _ => Ok(Precision::Float32),
    }
}

/// Runs `f` under the precision's autocast setting.
pub fn with_precision<T>(precision: Precision, f: impl FnOnce() -> T) -> T {
    match precision {
        Precision::Bf16Autocast => tch::autocast(true, f),
        Precision::Float32 => f(),
    }
}

/// Asks oneMKL (libtorch's CPU BLAS) for conditional numerical reproducibility, `MKL_CBWR=AUTO`,
/// unless the user chose a mode. Without it MKL does not promise the same bits from run to run,
/// and on a loaded machine two runs of the same step once differed in the 7th digit (the
/// resume test caught it), which breaks the promise that a resumed or re-sharded run retraces
/// the original. It costs nothing measurable here. It must run before libtorch's first MKL
/// call, so `main` calls it first.
pub fn reproducible_blas() {
    if std::env::var_os("MKL_CBWR").is_none() {
        std::env::set_var("MKL_CBWR", "AUTO");
    }
}

/// Intra-op threads for libtorch; 0 means one per available core.
pub fn configure_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
    n
}

/// Keeps freed memory in the process instead of returning it to the kernel.
///
/// glibc serves large blocks (activations, logits, gradients: tens of MB each) with mmap and
/// unmaps them on free, so every training step page-faults hundreds of MB back in; on these
/// VMs first-touch faults cost more than the copies themselves. Turning off mmap for the heap
/// and trimming makes the second step reuse the first step's pages.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Median float32 matmul throughput (GFLOP/s) of a 2048³ product on `device`, measured as
/// the PyTorch reference benchmark measures its peak.
pub fn matmul_gflops(device: Device) -> f64 {
    let n = 2048i64;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let _ = a.mm(&b);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let c = a.mm(&b);
        // Waits for this device's work, not GPU 0's.
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        drop(c);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e9
}

#[cfg(test)]
mod device_tests {
    use super::*;

    /// `auto` follows a launcher's LOCAL_RANK over the visible GPUs (before: every process
    /// on a multi-GPU host took GPU 0), and the CPU when none is visible.
    #[test]
    fn auto_follows_local_rank_over_the_visible_gpus() {
        assert_eq!(auto_device(None, 0).unwrap(), Device::Cpu);
        assert_eq!(auto_device(Some("3"), 0).unwrap(), Device::Cpu);
        assert_eq!(auto_device(None, 4).unwrap(), Device::Cuda(0));
        assert_eq!(auto_device(Some("2"), 4).unwrap(), Device::Cuda(2));
        assert_eq!(auto_device(Some("5"), 4).unwrap(), Device::Cuda(1));
        let err = auto_device(Some("first"), 2).unwrap_err().to_string();
        assert!(
            err.contains("LOCAL_RANK") && err.contains("`first`"),
            "{err}"
        );
    }

    /// A GPU index past the last visible GPU is an error naming the device and the count,
    /// never a libtorch panic later.
    #[test]
    fn cuda_index_is_checked_against_the_visible_gpus() {
        assert_eq!(cuda_device("cuda", 0, 1).unwrap(), Device::Cuda(0));
        assert_eq!(cuda_device("cuda:3", 3, 4).unwrap(), Device::Cuda(3));
        let err = cuda_device("cuda:5", 5, 2).unwrap_err().to_string();
        assert!(
            err.contains("`cuda:5`") && err.contains("sees 2 GPUs (cuda:0 to cuda:1)"),
            "{err}"
        );
        let err = cuda_device("cuda:1", 1, 1).unwrap_err().to_string();
        assert!(err.contains("sees 1 GPU (cuda:0)"), "{err}");
        let err = cuda_device("cuda", 0, 0).unwrap_err().to_string();
        assert!(
            err.contains("`cuda`") && err.contains("no GPU is visible"),
            "{err}"
        );
    }
}
