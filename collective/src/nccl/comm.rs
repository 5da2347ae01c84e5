//! [`NcclCollective`], the communicator of one generation, and its [`Collective`] operations
//! (see "Streams" and "Timeouts and aborts" in the [module docs](super)).

use super::abort::{
    abort_slot, async_state, lock, wait_async, Backoff, CommSlot, NcclAbortHandle, Shared,
};
use super::loader::{cuda_device_count, cuda_objects, ready, version_string, NcclLib};
use super::{
    cuda_err, nccl_err, nccl_error, Stream, CONFIG_LAYOUT_VERSION, CONFIG_MAGIC, CONFIG_UNDEF_INT,
    IN_PROGRESS, SUCCESS, UNIQUE_ID_BYTES,
};
use crate::{validate, Collective, CollectiveError, GroupSpec, MAX_ALL_GATHER_BLOCK_BYTES};
use crate::{StreamMark, StreamMarker};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Marks the default stream of a communicator's device, for [`Collective::all_reduce_sum_after`]:
/// called by the autograd thread that just enqueued a bucket's copy there.
pub struct NcclStreamMarker {
    stream: Arc<CudaStream>,
}

impl StreamMarker for NcclStreamMarker {
    fn mark(&self) -> Result<StreamMark, CollectiveError> {
        // record_event makes the device's context current on this thread first; it is the
        // primary context libtorch's kernels run in.
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| cuda_err("overlapped all_reduce_sum", "marking a bucket ready", e))?;
        Ok(StreamMark::new(event))
    }
}

/// NCCL communicator of one generation on one GPU.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    device: usize,
    timeout: Duration,
    lib: &'static NcclLib,
    shared: Arc<Shared>,
    /// A previous operation failed and the communicator was aborted.
    broken: bool,
    /// Recorded after each operation on `stream`, polled for completion.
    done: CudaEvent,
    /// The legacy default stream of `ctx` (not owned: dropping it destroys nothing).
    stream: Arc<CudaStream>,
    /// The stream overlapped all-reduces run on, made at the first one.
    side: Option<Arc<CudaStream>>,
    /// The device's primary context, the one libtorch uses; made current before NCCL calls.
    ctx: Arc<CudaContext>,
    /// One float on the device: what `barrier` all-reduces.
    barrier_buf: Tensor,
    /// `config.commName`; kept alive as long as the communicator in case NCCL keeps the pointer.
    _name: CString,
}

impl NcclCollective {
    /// Joins the communicator of `spec.generation` as `spec.rank` on CUDA device `device`
    /// (this process's ordinal, after `CUDA_VISIBLE_DEVICES`; one process per GPU). Blocks
    /// until all `spec.world_size` ranks have joined, or fails after `spec.timeout`.
    pub fn new(spec: &GroupSpec, unique_id: &[u8], device: usize) -> Result<Self, CollectiveError> {
        Self::new_with_abort_handle(spec, unique_id, device, NcclAbortHandle::new())
    }

    /// Like `new`, with a handle made beforehand (`NcclAbortHandle::new`), so that a watchdog
    /// can abort the initialisation as well. The handle must be fresh: not aborted, and not
    /// attached to another communicator.
    pub fn new_with_abort_handle(
        spec: &GroupSpec,
        unique_id: &[u8],
        device: usize,
        abort: NcclAbortHandle,
    ) -> Result<Self, CollectiveError> {
        const OP: &str = "communicator init";
        validate(spec)?;
        let invalid = |m: String| CollectiveError::InvalidArgument(format!("{OP}: {m}"));
        let nranks = c_int::try_from(spec.world_size)
            .map_err(|_| invalid(format!("world size {} too large", spec.world_size)))?;
        let rank = spec.rank as c_int; // < world size, checked by validate
        if unique_id.len() != UNIQUE_ID_BYTES {
            return Err(invalid(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
                unique_id.len()
            )));
        }
        let lib = ready()?;
        let devices = cuda_device_count();
        if device >= devices {
            return Err(invalid(format!(
                "CUDA device {device} requested, {devices} visible"
            )));
        }
        if abort.abort_requested() {
            return Err(CollectiveError::AbortRequested { op: OP });
        }
        let (ctx, stream, done) = cuda_objects(device)?;
        let barrier_buf =
            Tensor::f_zeros([1], (Kind::Float, Device::Cuda(device))).map_err(|e| {
                nccl_err(
                    OP,
                    format!("allocating the barrier buffer on cuda:{device}: {e}"),
                )
            })?;
        let name = CString::new(format!("ferry-g{}-r{}", spec.generation, spec.rank))
            .expect("no NUL in a formatted name");
        let mut config = nonblocking_config(lib.version, &name);
        let mut id = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (dst, &src) in id.internal.iter_mut().zip(unique_id) {
            *dst = src as c_char;
        }

        let shared = Arc::clone(&abort.shared);
        let mut slot = lock(&shared.slot);
        if !slot.comm.is_null() {
            return Err(invalid(
                "the abort handle already belongs to a communicator".into(),
            ));
        }
        if abort.abort_requested() {
            return Err(CollectiveError::AbortRequested { op: OP });
        }
        let started = Instant::now();
        // ncclCommInitRankConfig takes the device from the calling thread's current context.
        ctx.bind_to_thread()
            .map_err(|e| nccl_err(OP, format!("making cuda:{device} current: {e}")))?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer, id by value, config initialised as NCCL_CONFIG_INITIALIZER
        // would and alive for the call (and `name` for the communicator's life).
        let code = unsafe { (lib.comm_init_rank_config)(&mut comm, nranks, id, rank, &mut config) };
        // From here on the slot owns the communicator, so every failure below aborts it.
        slot.comm = comm;
        let result = match code {
            SUCCESS | IN_PROGRESS if comm.is_null() => Err(nccl_err(
                "ncclCommInitRankConfig",
                "returned no communicator".into(),
            )),
            SUCCESS | IN_PROGRESS => wait_async(lib, &shared, comm, OP, started, spec.timeout),
            code => Err(nccl_error(lib, "ncclCommInitRankConfig", code)),
        };
        if let Err(e) = result {
            abort_slot(&mut slot);
            return Err(e);
        }
        drop(slot);
        Ok(NcclCollective {
            rank: spec.rank,
            world_size: spec.world_size,
            device,
            timeout: spec.timeout,
            lib,
            shared,
            broken: false,
            done,
            stream,
            side: None,
            ctx,
            barrier_buf,
            _name: name,
        })
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// This process's CUDA ordinal, the one the communicator and its tensors live on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The NCCL library in use and its version code (e.g. 22907 for 2.29.7), for logs.
    pub fn library(&self) -> (&'static str, i32) {
        (&self.lib.path, self.lib.version)
    }

    /// Enqueues one NCCL operation with `launch` (given the library, the communicator and the
    /// stream) on the default stream and waits until it has completed on the device, failed,
    /// been aborted, or timed out. Any failure aborts the communicator and breaks the group.
    fn run(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(&NcclLib, ncclComm_t, Stream) -> c_int,
    ) -> Result<(), CollectiveError> {
        let stream = Arc::clone(&self.stream);
        self.run_on(op, &stream, launch)
    }

    /// [`run`](Self::run) on `stream`.
    fn run_on(
        &mut self,
        op: &'static str,
        stream: &CudaStream,
        launch: impl FnOnce(&NcclLib, ncclComm_t, Stream) -> c_int,
    ) -> Result<(), CollectiveError> {
        if self.broken {
            return Err(CollectiveError::Broken);
        }
        let shared = Arc::clone(&self.shared);
        let mut slot = lock(&shared.slot);
        let result = self.run_locked(&slot, op, stream, launch);
        // Checking the flag again before the lock is released closes the window in which a
        // handle could ask for an abort after the last poll and give up on the lock. An
        // operation that completed still returns Ok: its data is good; the next one fails.
        if result.is_err() || shared.abort_requested.load(Ordering::SeqCst) {
            self.broken = true;
            abort_slot(&mut slot);
        }
        result
    }

    fn run_locked(
        &self,
        slot: &CommSlot,
        op: &'static str,
        stream: &CudaStream,
        launch: impl FnOnce(&NcclLib, ncclComm_t, Stream) -> c_int,
    ) -> Result<(), CollectiveError> {
        let comm = slot.comm;
        if self.shared.abort_requested.load(Ordering::SeqCst) {
            return Err(CollectiveError::AbortRequested { op });
        }
        if comm.is_null() {
            return Err(CollectiveError::Broken);
        }
        let started = Instant::now();
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err(op, "making the device current", e))?;
        // The legacy default stream (null) or the side stream: see "Streams" in the module docs.
        let code = launch(self.lib, comm, stream.cu_stream() as Stream);
        match code {
            SUCCESS => {}
            // Non-blocking communicator still enqueueing: the kernels are on the stream only
            // once the async state leaves ncclInProgress.
            IN_PROGRESS => wait_async(self.lib, &self.shared, comm, op, started, self.timeout)?,
            code => return Err(nccl_error(self.lib, op, code)),
        }
        self.done
            .record(stream)
            .map_err(|e| cuda_err(op, "recording the completion event", e))?;
        let backoff = Backoff::new();
        loop {
            let finished = self
                .done
                .try_is_complete()
                .map_err(|e| cuda_err(op, "waiting for the kernels", e))?;
            // After the kernels, too: NCCL stops them early when it detects an error, so only
            // a clean async state says the data is complete.
            match async_state(self.lib, comm) {
                SUCCESS if finished => return Ok(()),
                SUCCESS | IN_PROGRESS => {}
                code => return Err(nccl_error(self.lib, op, code)),
            }
            if self.shared.abort_requested.load(Ordering::SeqCst) {
                return Err(CollectiveError::AbortRequested { op });
            }
            if started.elapsed() >= self.timeout {
                return Err(CollectiveError::DeviceTimeout {
                    op,
                    waited: started.elapsed(),
                });
            }
            backoff.pause();
        }
    }

    /// The device pointer and element count of `t`, after checking that NCCL can use it.
    fn device_tensor(
        &self,
        t: &Tensor,
        op: &'static str,
    ) -> Result<(*mut c_void, usize, Kind), CollectiveError> {
        let bad = |m: String| Err(CollectiveError::InvalidArgument(format!("{op}: {m}")));
        if t.device() != Device::Cuda(self.device) {
            return bad(format!(
                "the NCCL collective needs tensors on cuda:{}, got {:?}",
                self.device,
                t.device()
            ));
        }
        let kind = t
            .f_kind()
            .map_err(|e| CollectiveError::InvalidArgument(format!("{op}: {e}")))?;
        if !t.is_contiguous() {
            return bad("needs a contiguous tensor".into());
        }
        Ok((t.data_ptr(), t.numel(), kind))
    }

    /// Fails like an operation would when the group can no longer be used; for calls that
    /// have nothing to transfer but must still report a broken or aborted group.
    fn check_usable(&self, op: &'static str) -> Result<(), CollectiveError> {
        if self.broken {
            Err(CollectiveError::Broken)
        } else if self.shared.abort_requested.load(Ordering::SeqCst) {
            Err(CollectiveError::AbortRequested { op })
        } else {
            Ok(())
        }
    }

    /// All-gathers `count` elements of `dtype` from `send` into `recv` (world × count).
    fn all_gather_raw(
        &mut self,
        send: &Tensor,
        recv: &mut Tensor,
        count: usize,
        dtype: ncclDataType_t,
    ) -> Result<(), CollectiveError> {
        let (src, dst) = (send.data_ptr(), recv.data_ptr());
        self.run("all_gather", |lib, comm, stream| unsafe {
            // SAFETY: both buffers are contiguous device tensors on this device, of
            // `count` and `world × count` elements, kept alive by the borrows until the
            // operation has completed or the communicator was aborted (and any later use of
            // the memory is stream-ordered after the kernels).
            (lib.all_gather)(src, dst, count, dtype as c_int, comm, stream)
        })
    }

    /// The side stream, made on first use (see "Streams" in the module docs).
    fn side_stream(&mut self, op: &'static str) -> Result<Arc<CudaStream>, CollectiveError> {
        if let Some(side) = &self.side {
            return Ok(Arc::clone(side));
        }
        let side = self
            .ctx
            .new_stream()
            .map_err(|e| cuda_err(op, "making the side stream", e))?;
        self.side = Some(Arc::clone(&side));
        Ok(side)
    }

    /// In-place sum of `t` (see `all_reduce_sum`) enqueued on `stream`.
    fn all_reduce_sum_on(
        &mut self,
        op: &'static str,
        t: &mut Tensor,
        stream: &CudaStream,
    ) -> Result<(), CollectiveError> {
        let (ptr, count, kind) = self.device_tensor(t, op)?;
        let dtype = reduce_dtype(kind, self.lib.version).ok_or_else(|| {
            CollectiveError::InvalidArgument(format!(
                "{op}: NCCL {} cannot sum {kind:?} tensors",
                version_string(self.lib.version)
            ))
        })?;
        if count == 0 {
            return self.check_usable(op);
        }
        let sum = ncclRedOp_t::ncclSum as c_int;
        self.run_on(op, stream, |lib, comm, stream| unsafe {
            // SAFETY: `ptr` is `count` contiguous elements of `dtype` on this device, kept
            // alive and unaliased by `&mut t` until the operation is over (see all_gather_raw).
            (lib.all_reduce)(ptr, ptr, count, dtype as c_int, sum, comm, stream)
        })
    }
}

impl Drop for NcclCollective {
    /// A healthy communicator is finalised (flushing NCCL's work, with the group's timeout)
    /// and destroyed; a broken one, one whose finalisation fails or stalls, and one whose
    /// abort was requested, is aborted.
    fn drop(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mut slot = lock(&shared.slot);
        if slot.comm.is_null() {
            return;
        }
        if self.broken || shared.abort_requested.load(Ordering::SeqCst) {
            return abort_slot(&mut slot);
        }
        let comm = slot.comm;
        let started = Instant::now();
        let _ = self.ctx.bind_to_thread();
        // SAFETY: a live communicator, used by no other thread (we hold its lock).
        let code = unsafe { (self.lib.comm_finalize)(comm) };
        let finalized = matches!(code, SUCCESS | IN_PROGRESS)
            && wait_async(
                self.lib,
                &shared,
                comm,
                "ncclCommFinalize",
                started,
                self.timeout,
            )
            .is_ok();
        if finalized {
            // SAFETY: finalised, so destroying frees local resources only.
            unsafe { (self.lib.comm_destroy)(comm) };
            slot.comm = std::ptr::null_mut();
        } else {
            abort_slot(&mut slot);
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn transport(&self) -> &'static str {
        "nccl"
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    /// A float32 tensor summed as bfloat16: NCCL adds bfloat16 inputs in float32 and rounds
    /// each partial sum back, as the TCP ring does.
    fn all_reduce_sum_bf16(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let mut half = t.to_kind(Kind::BFloat16);
        self.all_reduce_sum(&mut half)?;
        t.copy_(&half);
        Ok(())
    }

    /// In-place sum of a contiguous CUDA tensor of float32, bfloat16, float16, float64,
    /// int8, uint8, int32 or int64 (float8 with NCCL >= 2.24 on GPUs that support it).
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let stream = Arc::clone(&self.stream);
        self.all_reduce_sum_on("all_reduce_sum", t, &stream)
    }

    fn stream_marker(&self) -> Option<Arc<dyn StreamMarker>> {
        Some(Arc::new(NcclStreamMarker {
            stream: Arc::clone(&self.stream),
        }))
    }

    /// The sum on the side stream, after the default stream's work up to `mark`.
    fn all_reduce_sum_after(
        &mut self,
        t: &mut Tensor,
        mark: &StreamMark,
    ) -> Result<(), CollectiveError> {
        const OP: &str = "overlapped all_reduce_sum";
        let Some(ready) = mark.get::<CudaEvent>() else {
            return Err(CollectiveError::InvalidArgument(format!(
                "{OP}: the mark was not made by an NCCL collective's stream marker"
            )));
        };
        self.check_usable(OP)?;
        let side = self.side_stream(OP)?;
        side.wait(ready)
            .map_err(|e| cuda_err(OP, "making the side stream wait for the bucket", e))?;
        self.all_reduce_sum_on(OP, t, &side)
    }

    /// Copies root's tensor into every rank's tensor, as bytes: any dtype, same shape and
    /// dtype on every rank, contiguous, on this communicator's device.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        const OP: &str = "broadcast";
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "{OP}: root {root} outside world of {}",
                self.world_size
            )));
        }
        let (ptr, count, kind) = self.device_tensor(t, OP)?;
        let bytes = count * kind.elt_size_in_bytes();
        if bytes == 0 {
            return self.check_usable(OP);
        }
        let (uint8, root) = (ncclDataType_t::ncclUint8 as c_int, root as c_int);
        self.run(OP, |lib, comm, stream| unsafe {
            // SAFETY: as in all_reduce_sum, with `bytes` bytes.
            (lib.broadcast)(ptr, ptr, bytes, uint8, root, comm, stream)
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // Nobody's sum is complete before everyone has contributed to it.
        let ptr = self.barrier_buf.data_ptr();
        let float = ncclDataType_t::ncclFloat32 as c_int;
        let sum = ncclRedOp_t::ncclSum as c_int;
        self.run("barrier", |lib, comm, stream| unsafe {
            // SAFETY: one float owned by self for the communicator's life.
            (lib.all_reduce)(ptr, ptr, 1, float, sum, comm, stream)
        })
    }

    /// Two NCCL all-gathers through device buffers: every rank's length, then every rank's
    /// bytes padded to the longest. Meant for small metadata, not bulk data.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        const OP: &str = "all_gather";
        let (n, device) = (self.world_size, Device::Cuda(self.device));
        let staging = |e: tch::TchError| nccl_err(OP, format!("staging buffers: {e}"));

        let len = i64::try_from(mine.len()).map_err(|_| {
            CollectiveError::InvalidArgument(format!("{OP}: {} bytes is too many", mine.len()))
        })?;
        let my_len = Tensor::f_from_slice(&[len])
            .and_then(|t| t.f_to(device))
            .map_err(staging)?;
        let mut lens = Tensor::f_zeros([n as i64], (Kind::Int64, device)).map_err(staging)?;
        self.all_gather_raw(&my_len, &mut lens, 1, ncclDataType_t::ncclInt64)?;
        let lens = host_vec::<i64>(&lens, n).map_err(staging)?;
        let sizes = announced_block_sizes(&lens)?;
        let longest = sizes.iter().copied().max().unwrap_or(0);
        if longest == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let total = longest.checked_mul(n).filter(|&t| i64::try_from(t).is_ok());
        let Some(total) = total else {
            return Err(CollectiveError::InvalidArgument(format!(
                "{OP}: {n} ranks × {longest} bytes overflows"
            )));
        };

        let mut padded = vec![0u8; longest];
        padded[..mine.len()].copy_from_slice(mine);
        let send = Tensor::f_from_slice(&padded)
            .and_then(|t| t.f_to(device))
            .map_err(staging)?;
        let mut recv = Tensor::f_zeros([total as i64], (Kind::Uint8, device)).map_err(staging)?;
        self.all_gather_raw(&send, &mut recv, longest, ncclDataType_t::ncclUint8)?;
        let all = host_vec::<u8>(&recv, total).map_err(staging)?;
        Ok(all
            .chunks_exact(longest)
            .zip(&sizes)
            .map(|(block, &size)| block[..size].to_vec())
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers of the operations.

/// The block lengths the ranks announced for an all-gather, bounded before the receive buffer
/// (world × longest) is allocated: a peer's length is not to be trusted. Every rank sees the
/// same lengths, so every rank refuses together.
pub(super) fn announced_block_sizes(lens: &[i64]) -> Result<Vec<usize>, CollectiveError> {
    lens.iter()
        .enumerate()
        .map(|(peer, &l)| {
            usize::try_from(l)
                .ok()
                .filter(|&s| s <= MAX_ALL_GATHER_BLOCK_BYTES)
                .ok_or_else(|| CollectiveError::Protocol {
                    peer,
                    op: "all_gather",
                    reason: format!(
                        "announced a block of {l} bytes (at most {MAX_ALL_GATHER_BLOCK_BYTES})"
                    ),
                })
        })
        .collect()
}

/// The NCCL data type an all-reduce sums `kind` as, if NCCL `version` can.
pub(super) fn reduce_dtype(kind: Kind, version: c_int) -> Option<ncclDataType_t> {
    use ncclDataType_t::*;
    Some(match kind {
        Kind::Uint8 => ncclUint8,
        Kind::Int8 => ncclInt8,
        Kind::Int => ncclInt32,
        Kind::Int64 => ncclInt64,
        Kind::Half => ncclFloat16,
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::BFloat16 => ncclBfloat16,
        // FP8 reductions arrived in NCCL 2.24 (and need a GPU that has them).
        Kind::Float8e4m3fn if version >= 22400 => ncclFloat8e4m3,
        Kind::Float8e5m2 if version >= 22400 => ncclFloat8e5m2,
        _ => return None,
    })
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0` and a name for NCCL's logs. Listing every
/// field makes a change of cudarc's NCCL feature (another layout) a compile error here.
pub(super) fn nonblocking_config(lib_version: c_int, name: &CStr) -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: lib_version.min(CONFIG_LAYOUT_VERSION) as c_uint,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: name.as_ptr(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
        graphUsageMode: CONFIG_UNDEF_INT,
        numRmaCtx: CONFIG_UNDEF_INT,
        maxP2pPeers: CONFIG_UNDEF_INT,
    }
}

/// The first `n` elements of a device tensor, copied to the host.
fn host_vec<T: tch::kind::Element + Default + Clone>(
    t: &Tensor,
    n: usize,
) -> Result<Vec<T>, tch::TchError> {
    let host = t.f_to(Device::Cpu)?;
    let mut out = vec![T::default(); n];
    host.f_copy_data(&mut out, n)?;
    Ok(out)
}
