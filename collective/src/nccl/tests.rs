use super::abort::lock;
use super::comm::{announced_block_sizes, nonblocking_config, reduce_dtype};
use super::loader::{
    candidate_files, dlopen_name, libtorch_dirs, nccl_lib, open_nccl, version_string,
};
use super::*;
use crate::{Collective, GroupSpec, StreamMark};
use cudarc::nccl::sys::ncclDataType_t;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn spec() -> GroupSpec {
    GroupSpec {
        rank: 0,
        world_size: 2,
        peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        generation: 1,
        job_token: "t".into(),
        timeout: Duration::from_secs(5),
        message_mac: true,
    }
}

/// The CPU-box promise: no GPU means "unavailable", as values, and no panic from cudarc.
/// On a GPU machine the same calls must give an id, or say which library is missing.
#[test]
fn nccl_is_reported_unavailable_without_a_gpu() {
    if tch::Cuda::is_available() {
        match unique_id() {
            Ok(id) => assert_eq!(id.len(), UNIQUE_ID_BYTES),
            Err(CollectiveError::Unavailable { message }) => {
                assert!(message.to_lowercase().contains("nccl"), "{message}")
            }
            Err(other) => panic!("a GPU machine: expected an id or Unavailable, got {other}"),
        }
        return;
    }
    assert!(!nccl_available());
    match unique_id() {
        Err(CollectiveError::Unavailable { message }) => assert!(message.contains("CUDA")),
        other => panic!("expected Unavailable, got {:?}", other.map(|id| id.len())),
    }
    let made = NcclCollective::new(&spec(), &[0u8; UNIQUE_ID_BYTES], 0);
    assert!(matches!(made, Err(CollectiveError::Unavailable { .. })));
    // Argument errors still come first, as for the ring.
    let made = NcclCollective::new(&spec(), &[0u8; 3], 0);
    assert!(matches!(made, Err(CollectiveError::InvalidArgument(_))));
}

/// Trap (2) of DESIGN.md, pinned: cudarc never asks for NCCL's soname, which is why this
/// module loads NCCL itself. If cudarc learns `libnccl.so.2`, the loader can be simplified.
#[test]
fn cudarc_does_not_look_for_the_nccl_soname() {
    let names = cudarc::get_lib_name_candidates("nccl");
    assert!(names.iter().any(|n| n == "libnccl.so"), "{names:?}");
    assert!(!names.iter().any(|n| n == NCCL_SONAME), "{names:?}");
}

/// The loader finds the wheel's NCCL where there is one (without a GPU: only dlopen and
/// ncclGetVersion run), and otherwise explains itself; it never panics.
#[test]
fn nccl_library_is_found_or_explained() {
    match nccl_lib() {
        Ok(lib) => {
            assert!(lib.version >= MIN_NCCL_VERSION);
            assert!(lib.path.contains("libnccl"), "{}", lib.path);
            eprintln!("NCCL {} from {}", version_string(lib.version), lib.path);
            // Where it was loaded, cudarc's first choice is still not loadable by name
            // unless some libnccl.so exists on the search path.
            let cudarc_would_find = dlopen_name("libnccl.so", libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            eprintln!("dlopen(\"libnccl.so\") after loading it: {cudarc_would_find:?}");
        }
        Err(message) => {
            assert!(message.contains(NCCL_LIB_ENV), "{message}");
            // Explaining is for machines without it: where the wheel ships NCCL next to
            // libtorch (as torch's CUDA wheels do), it must be found.
            let shipped = candidate_files().into_iter().filter(|f| f.exists());
            let shipped: Vec<PathBuf> = shipped.collect();
            assert!(shipped.is_empty(), "{message}, although {shipped:?} exist");
        }
    }
}

/// The wheel's nvidia/nccl/lib next to the loaded libtorch is searched, and an explicit
/// FERRY_NCCL_LIB wins or fails loudly.
#[test]
fn nccl_is_looked_for_next_to_libtorch_and_where_told() {
    let torch = libtorch_dirs();
    assert!(!torch.is_empty(), "every test binary links libtorch");
    let files = candidate_files();
    let wheel: Vec<PathBuf> = torch
        .iter()
        .filter_map(|d| d.parent().and_then(Path::parent))
        .map(|site| site.join("nvidia/nccl/lib").join(NCCL_SONAME))
        .collect();
    assert!(wheel.iter().all(|f| files.contains(f)), "{files:?}");
    let missing = open_nccl(Some("/nonexistent/libnccl.so.2".into())).unwrap_err();
    assert!(missing.starts_with(NCCL_LIB_ENV), "{missing}");
    if let Some(present) = wheel.iter().find(|f| f.exists()) {
        let dir = present.parent().unwrap().as_os_str().to_owned();
        let handle = open_nccl(Some(dir)).expect("the wheel's NCCL opens by directory");
        assert!(!handle.is_null());
    }
}

#[test]
fn handles_can_go_to_a_watchdog_thread() {
    fn watchdog_ready<T: Send + Sync + Clone + 'static>() {}
    fn movable<T: Send>() {}
    watchdog_ready::<NcclAbortHandle>();
    movable::<NcclCollective>();
}

#[test]
fn dtypes_map_to_nccl_types() {
    use ncclDataType_t::*;
    assert_eq!(reduce_dtype(Kind::Float, 22907), Some(ncclFloat32));
    assert_eq!(reduce_dtype(Kind::BFloat16, 22907), Some(ncclBfloat16));
    assert_eq!(reduce_dtype(Kind::Half, 22907), Some(ncclFloat16));
    assert_eq!(reduce_dtype(Kind::Int64, 22907), Some(ncclInt64));
    assert_eq!(
        reduce_dtype(Kind::Float8e4m3fn, 22907),
        Some(ncclFloat8e4m3)
    );
    assert_eq!(reduce_dtype(Kind::Float8e4m3fn, 22300), None);
    assert_eq!(reduce_dtype(Kind::Bool, 22907), None);
    assert_eq!(reduce_dtype(Kind::ComplexFloat, 22907), None);
}

#[test]
fn config_is_nonblocking_and_claims_no_newer_layout() {
    let name = CString::new("x").unwrap();
    let c = nonblocking_config(22907, &name);
    assert_eq!((c.size, c.magic, c.blocking), (96, CONFIG_MAGIC, 0));
    assert_eq!(c.version, 22907);
    assert_eq!(c.minCTAs, CONFIG_UNDEF_INT);
    assert_eq!(
        nonblocking_config(23105, &name).version,
        CONFIG_LAYOUT_VERSION as c_uint
    );
    assert_eq!(version_string(22907), "2.29.7");
    assert_eq!(version_string(2804), "2.8.4");
    assert_eq!(result_name(IN_PROGRESS), "ncclInProgress");
    assert_eq!(result_name(42), "unknown NCCL result");
}

#[test]
fn an_unattached_abort_handle_aborts_nothing_and_stays_aborted() {
    let handle = NcclAbortHandle::new();
    let clone = handle.clone();
    assert!(!clone.abort_requested());
    handle.abort();
    handle.abort();
    assert!(clone.abort_requested());
    assert!(lock(&clone.shared.slot).comm.is_null());
}

/// The data-parallel watchdog aborts from a task on the worker's async runtime, whose one
/// worker thread also sends heartbeats. While an operation holds the communicator (here the
/// test holds its slot, as a blocked NCCL call does), `abort` waits up to 5 s; run there, it
/// stalled every other task that long. `abort_in_background` must leave the thread free.
#[test]
fn an_abort_from_the_runtime_leaves_its_thread_free_while_an_operation_holds_the_communicator() {
    let handle = NcclAbortHandle::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let busy = lock(&handle.shared.slot);
    let h = handle.clone();
    let aborter = rt.spawn(async move { h.abort_in_background() });
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    let heartbeat = rt.spawn(async { Instant::now() });
    let ran = rt.block_on(heartbeat).unwrap();
    assert!(
        ran.duration_since(asked) < Duration::from_secs(1),
        "a task on the runtime waited {:?} behind the abort",
        ran.duration_since(asked)
    );
    assert!(handle.abort_requested());
    drop(busy);
    let thread = rt.block_on(aborter).unwrap().expect("an abort thread");
    thread.join().unwrap();
    assert!(lock(&handle.shared.slot).comm.is_null());
}

/// The overlapped sum on a one-rank communicator: the side stream waits for the marked
/// work of the default stream (a tensor still being written by a queue of kernels when the
/// mark is taken), the sum completes, and a mark of another kind is refused. Needs a GPU;
/// `scripts/gpu-check.sh` runs it with `--ignored`.
#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it"]
fn overlapped_sum_waits_for_its_mark_on_a_gpu() {
    assert!(nccl_available(), "this test needs a GPU with NCCL");
    let spec = GroupSpec {
        world_size: 1,
        peers: vec!["127.0.0.1:1".into()],
        ..spec()
    };
    let id = unique_id().expect("an NCCL id");
    let mut nccl = NcclCollective::new(&spec, &id, 0).expect("a one-rank communicator");
    let device = Device::Cuda(0);
    let m = Tensor::ones([2048, 2048], (Kind::Float, device)) / 2048.0;
    let mut t = Tensor::ones([2048, 2048], (Kind::Float, device));
    // Enough kernels that they are still queued when the mark is taken; each matmul by
    // the averaging matrix leaves ones as ones.
    for _ in 0..50 {
        t = t.matmul(&m);
    }
    let mut t = t.reshape([-1]);
    let marker = nccl.stream_marker().expect("NCCL marks its stream");
    let mark = marker.mark().expect("a mark");
    nccl.all_reduce_sum_after(&mut t, &mark)
        .expect("the overlapped sum");
    let max_error = (t - 1.0).abs().max().double_value(&[]);
    assert!(max_error < 1e-3, "{max_error}");
    let mut other = Tensor::ones([4], (Kind::Float, device));
    let foreign = StreamMark::new(7usize);
    assert!(matches!(
        nccl.all_reduce_sum_after(&mut other, &foreign),
        Err(CollectiveError::InvalidArgument(_))
    ));
}

/// A peer's all-gather length (from the network, through NCCL) is bounded before the
/// receive buffer of world × longest bytes is allocated; before, 2^40 was taken as it came.
#[test]
fn announced_all_gather_lengths_are_bounded_before_allocation() {
    assert_eq!(
        announced_block_sizes(&[3, 0, 17]).expect("small blocks"),
        vec![3, 0, 17]
    );
    let max = crate::MAX_ALL_GATHER_BLOCK_BYTES as i64;
    assert!(announced_block_sizes(&[1, max]).is_ok());
    for bad in [max + 1, 1 << 40, -1, i64::MIN] {
        let e = announced_block_sizes(&[1, bad]).expect_err("an unbounded length was taken");
        assert!(
            matches!(e, CollectiveError::Protocol { peer: 1, .. }),
            "{bad}: {e}"
        );
    }
}
