//! The NCCL backend of [`Collective`]: one communicator per generation, one process per GPU.
//!
//! Rank 0 makes an id with [`unique_id`]; it travels to the other ranks in the coordinator's
//! Rendezvous blob; every rank then calls [`NcclCollective::new`] with it. The peers' data-plane
//! addresses in [`GroupSpec`] are not used: NCCL bootstraps from the address inside the id and
//! picks its own transports (NVLink, PCIe, InfiniBand, sockets; see the `NCCL_*` variables).
//!
//! # How libnccl is found, and why not by cudarc
//!
//! NCCL's soname is `libnccl.so.2`. cudarc's `dynamic-loading` looks only for `libnccl.so`,
//! `libnccl64*.so`, `libnccl.so.13`, `.12`, `.11`, `.10`, `.9` and `.1` (see
//! `cudarc::get_lib_name_candidates`), and it offers no way to name a file. Loading the real
//! library first does not help: glibc's `dlopen("libnccl.so")` matches an already loaded
//! object only by path or soname, and `libnccl.so` is neither; the search path it would use
//! instead (`LD_LIBRARY_PATH`, the binary's RUNPATH) is fixed when the process starts. So no
//! amount of pre-loading makes cudarc's NCCL loader succeed with the torch wheel's library,
//! and where it does find one (a system `libnccl.so` from libnccl-dev) that may be another NCCL
//! than the one libtorch_cuda already runs, the second copy in one process.
//!
//! This module therefore opens NCCL itself and resolves the dozen entry points it calls with
//! `dlsym`, typed with cudarc's NCCL declarations (`cudarc::nccl::sys`: ids, configs, data
//! types, result codes). It never calls a `cudarc::nccl` function (that would panic in
//! cudarc's loader); nothing else in ferry should either. Order of search:
//!
//! 1. `FERRY_NCCL_LIB`: a file, or a directory holding `libnccl.so.2` (or `libnccl.so`). When
//!    set it is the only place tried, and failing to load it is an error.
//! 2. The copy already in the process: libtorch_cuda.so of the CUDA wheels has `libnccl.so.2`
//!    as a DT_NEEDED dependency (found through its `$ORIGIN/../../nvidia/nccl/lib` rpath), so
//!    in a GPU build it is loaded at start-up; `dlopen(.., RTLD_NOLOAD)` returns it, and NCCL
//!    is then exactly the one libtorch was built against.
//! 3. Next to the loaded libtorch (located with `dl_iterate_phdr`, symlinks resolved): the
//!    wheel's `site-packages/nvidia/nccl/lib/`, then libtorch's own `lib/`.
//! 4. Every directory of `LD_LIBRARY_PATH`.
//! 5. The dynamic linker's own search (`ld.so.cache`, system directories) for `libnccl.so.2`,
//!    then `libnccl.so`.
//!
//! The library is opened with `RTLD_NOW | RTLD_GLOBAL` and never closed.
//!
//! The CUDA driver API (primary context, events) does go through cudarc (`cudarc::driver`):
//! its loader's candidates include `libcuda.so.1`, the driver's soname, which is loaded
//! whenever libtorch sees a GPU. It too panics when the library is missing, so it is probed
//! first and its first use runs under `catch_unwind`.
//!
//! # Streams
//!
//! Every operation is enqueued on the legacy default ("null") stream of the communicator's
//! device, the stream libtorch runs its kernels on unless a caller installs another current
//! stream (tch offers no way to, or to read it). So an operation is ordered after the kernels
//! that produced the tensor and before those that read it, with no extra synchronisation.
//! The call still returns only once the operation has completed on the device (an event
//! recorded after it is polled), because completion is what the timeout and the error report
//! are about and because `all_gather` returns host bytes.
//!
//! The one exception is the all-reduce overlapped with backward, DDP's way
//! ([`Collective::all_reduce_sum_after`]): there a gradient hook records a CUDA event on the
//! default stream right after enqueueing a bucket's copy ([`NcclStreamMarker`]), and the sum
//! runs on a side stream of this communicator (non-blocking, so the legacy default stream
//! does not serialise with it) that first waits for that event. The kernels backward queues
//! after the event keep the default stream busy while NCCL's kernels run beside them. The
//! bucket's memory stays alive until the call has seen the sum complete, and whoever reads it
//! afterwards is on the host side of that completion, so no `recordStream` is needed.
//!
//! # Timeouts and aborts
//!
//! Communicators are created non-blocking (`ncclConfig_t::blocking = 0`), so no NCCL call
//! blocks for long: initialisation and the enqueueing of an operation report
//! `ncclInProgress` and are polled with `ncclCommGetAsyncError`; completion is polled with
//! `cuEventQuery` together with `ncclCommGetAsyncError` (which carries errors such as a peer
//! that died: NCCL may stop the kernels early, so a completed event alone does not mean
//! good data). When `spec.timeout` passes first, the communicator is aborted
//! (`ncclCommAbort` makes NCCL's kernels and proxy threads quit) and the operation fails
//! with [`CollectiveError::DeviceTimeout`]. Any failure aborts the communicator; the
//! collective is then `Broken`, as the ring's is, and the worker must rendezvous again.
//! The timeout counts from the call, so it also covers kernels queued before it on the stream.
//!
//! An [`NcclAbortHandle`] aborts from another thread (the coordinator's watchdog). It only
//! raises a flag and takes the communicator's lock: a running operation (or initialisation)
//! sees the flag within a poll interval, aborts the communicator itself and returns
//! [`CollectiveError::AbortRequested`]; an idle communicator is aborted by the handle's
//! thread. NCCL is never entered from two threads at once for the same communicator.
//!
//! Caveats: `NCCL_COMM_BLOCKING=1` in the environment overrides the non-blocking config, and
//! then initialisation and enqueueing block inside NCCL with no timeout. NCCL's bootstrap
//! and transports are not authenticated; the id (which holds rank 0's bootstrap address and
//! a random magic) must travel only over the coordinator's authenticated channel.

use super::{validate, Collective, CollectiveError, GroupSpec};
use super::{StreamMark, StreamMarker};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use cudarc::nccl::sys::{
    ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Environment variable naming the NCCL library to use: a file, or a directory holding it.
pub const NCCL_LIB_ENV: &str = "FERRY_NCCL_LIB";

/// The soname NCCL 2.x is linked and shipped under.
const NCCL_SONAME: &str = "libnccl.so.2";

/// Bytes in an `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = std::mem::size_of::<ncclUniqueId>();

/// Oldest NCCL accepted: non-blocking communicators, `ncclCommFinalize` and
/// `ncclCommGetAsyncError` reporting `ncclInProgress` all arrived in 2.14.
const MIN_NCCL_VERSION: c_int = 21400;

/// `NCCL_VERSION(2, 30, 0)`: the NCCL release whose `ncclConfig_t` layout cudarc's `nccl`
/// feature (= `nccl-02030`) declares. NCCL reads `min(config.size, its own size)` bytes and
/// ignores fields newer than `config.version`, so a struct of this layout is valid for older
/// and newer libraries alike, as long as `version` does not claim more than the layout holds.
const CONFIG_LAYOUT_VERSION: c_int = 23000;
// Changing cudarc's NCCL feature changes the layout: update CONFIG_LAYOUT_VERSION with it.
const _: () = assert!(std::mem::size_of::<ncclConfig_t>() == 96);

/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL (or its environment variables) decide".
const CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// `NCCL_API_MAGIC`, set by `NCCL_CONFIG_INITIALIZER`.
const CONFIG_MAGIC: c_uint = 0xcafe_beef;

const SUCCESS: c_int = ncclResult_t::ncclSuccess as c_int;
const IN_PROGRESS: c_int = ncclResult_t::ncclInProgress as c_int;

/// How long `NcclAbortHandle::abort` waits for the communicator's lock before leaving the
/// abort to the operation that holds it (which checks the flag before releasing the lock).
const ABORT_HANDLE_WAIT: Duration = Duration::from_secs(5);

/// `cudaStream_t`; null is the legacy default stream of the current device.
type Stream = *mut c_void;

/// True when CUDA and NCCL can be used in this process: libtorch sees a GPU, the CUDA driver
/// library can be opened, and an NCCL library was found and has every entry point this
/// backend uses. Never panics; never touches cudarc when it returns false.
pub fn nccl_available() -> bool {
    ready().is_ok()
}

/// A fresh `ncclUniqueId`, as the bytes to send to the other ranks. Rank 0 makes it; this
/// process must stay alive until every rank has joined the communicator built from it (NCCL's
/// bootstrap root listens in this process).
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    let lib = ready()?;
    let mut id = ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: `id` is a valid, writable ncclUniqueId.
    let code = unsafe { (lib.get_unique_id)(&mut id) };
    if code != SUCCESS {
        return Err(nccl_error(lib, "ncclGetUniqueId", code));
    }
    Ok(id.internal.iter().map(|&b| b as u8).collect())
}

/// Aborts a communicator from another thread; see the module docs. Clones share the flag.
#[derive(Clone)]
pub struct NcclAbortHandle {
    shared: Arc<Shared>,
}

impl Default for NcclAbortHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl NcclAbortHandle {
    /// A handle not yet attached to a communicator: pass it to
    /// [`NcclCollective::new_with_abort_handle`] to make initialisation abortable too.
    /// A handle belongs to one communicator; once aborted it stays aborted.
    pub fn new() -> Self {
        NcclAbortHandle {
            shared: Arc::new(Shared {
                abort_requested: AtomicBool::new(false),
                slot: Mutex::new(CommSlot {
                    comm: std::ptr::null_mut(),
                }),
            }),
        }
    }

    /// Aborts the communicator: an operation in progress (or initialisation) fails with
    /// `AbortRequested` within about a millisecond, plus the time `ncclCommAbort` takes;
    /// later ones fail at once. Returns when the communicator has been aborted, or after
    /// waiting 5 s for a busy operation to do it. Idempotent; never panics.
    pub fn abort(&self) {
        self.shared.abort_requested.store(true, Ordering::SeqCst);
        let give_up = Instant::now() + ABORT_HANDLE_WAIT;
        loop {
            match self.shared.slot.try_lock() {
                Ok(mut slot) => return abort_slot(&mut slot),
                Err(TryLockError::Poisoned(p)) => return abort_slot(&mut p.into_inner()),
                // The owner is inside an operation: it sees the flag at its next poll, or
                // before it releases the lock, and aborts itself; wait for that.
                Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(TryLockError::WouldBlock) => return,
            }
        }
    }

    /// Whether `abort` has been called on this handle or a clone.
    pub fn abort_requested(&self) -> bool {
        self.shared.abort_requested.load(Ordering::SeqCst)
    }
}

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
        let mut sizes = Vec::with_capacity(n);
        for (peer, &l) in lens.iter().enumerate() {
            let size = usize::try_from(l).map_err(|_| CollectiveError::Protocol {
                peer,
                op: OP,
                reason: format!("announced {l} bytes"),
            })?;
            sizes.push(size);
        }
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
// The communicator slot shared with abort handles.

/// The communicator pointer, or null before init and after abort/destroy. Only touched with
/// the lock held, so NCCL never sees the communicator from two threads at once.
struct CommSlot {
    comm: ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (the Mutex).
unsafe impl Send for CommSlot {}

struct Shared {
    abort_requested: AtomicBool,
    slot: Mutex<CommSlot>,
}

fn lock(m: &Mutex<CommSlot>) -> MutexGuard<'_, CommSlot> {
    // A panic while holding the lock leaves the slot consistent (the pointer is only ever
    // replaced whole), so poisoning is ignored.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `ncclCommAbort`s the communicator in `slot`, if any. Blocking: NCCL sets its abort flags
/// (kernels and proxy threads quit), waits for an unfinished init, and frees the communicator.
fn abort_slot(slot: &mut CommSlot) {
    let comm = std::mem::replace(&mut slot.comm, std::ptr::null_mut());
    if comm.is_null() {
        return;
    }
    // A communicator exists only if the library was loaded.
    if let Ok(lib) = nccl_lib() {
        // SAFETY: a communicator of this library, not yet aborted or destroyed, used by no
        // other thread (the caller holds the lock). The result is of no use: it is gone.
        unsafe { (lib.comm_abort)(comm) };
    }
}

/// Polls `ncclCommGetAsyncError` until it leaves `ncclInProgress`.
fn wait_async(
    lib: &NcclLib,
    shared: &Shared,
    comm: ncclComm_t,
    op: &'static str,
    started: Instant,
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let backoff = Backoff::new();
    loop {
        match async_state(lib, comm) {
            SUCCESS => return Ok(()),
            IN_PROGRESS => {}
            code => return Err(nccl_error(lib, op, code)),
        }
        if shared.abort_requested.load(Ordering::SeqCst) {
            return Err(CollectiveError::AbortRequested { op });
        }
        if started.elapsed() >= timeout {
            return Err(CollectiveError::DeviceTimeout {
                op,
                waited: started.elapsed(),
            });
        }
        backoff.pause();
    }
}

/// The communicator's asynchronous state: ncclSuccess, ncclInProgress or an error.
fn async_state(lib: &NcclLib, comm: ncclComm_t) -> c_int {
    let mut state: c_int = SUCCESS;
    // SAFETY: a live communicator and a valid out-pointer; `ncclResult_t` is an int-sized C enum.
    let code = unsafe { (lib.comm_get_async_error)(comm, &mut state) };
    if code != SUCCESS {
        code
    } else {
        state
    }
}

/// Polling cadence: operations on NVLink finish in tens of microseconds, so the first half
/// millisecond spins; a rank waiting for a straggler should not burn a core, so later polls
/// sleep, at most a millisecond.
struct Backoff(Instant);

impl Backoff {
    fn new() -> Self {
        Backoff(Instant::now())
    }

    fn pause(&self) {
        let waited = self.0.elapsed();
        if waited < Duration::from_micros(500) {
            std::hint::spin_loop();
        } else if waited < Duration::from_millis(10) {
            std::thread::yield_now();
        } else if waited < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finding and loading the libraries.

/// NCCL's entry points. Results are raw `c_int`s rather than cudarc's `ncclResult_t`: a code
/// this build does not know (a newer NCCL) must not become an invalid Rust enum value.
struct NcclLib {
    /// The file the symbols came from.
    path: String,
    /// `ncclGetVersion`: 22907 for 2.29.7.
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank_config: unsafe extern "C" fn(
        *mut ncclComm_t,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    comm_finalize: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    /// (send, recv, count, datatype, op, comm, stream)
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    /// (send, recv, count, datatype, root, comm, stream)
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    /// (send, recv, count per rank, datatype, comm, stream)
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, ncclComm_t, Stream) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
}

impl NcclLib {
    /// Resolves every entry point from `handle` and checks the version.
    ///
    /// # Safety
    /// `handle` comes from a successful `dlopen` of an NCCL 2.x library and is never closed.
    unsafe fn resolve(handle: *mut c_void) -> Result<Self, String> {
        unsafe fn sym<T: Copy>(handle: *mut c_void, name: &CStr) -> Result<T, String> {
            assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
            // SAFETY: per the caller; the symbol is NCCL's function of the declared signature.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                Err(format!("it has no symbol {}", name.to_string_lossy()))
            } else {
                Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
            }
        }
        // SAFETY: as above, for every symbol.
        unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> c_int =
                sym(handle, c"ncclGetVersion")?;
            let path =
                symbol_file(get_version as *const c_void).unwrap_or_else(|| "libnccl".into());
            let mut version: c_int = 0;
            if get_version(&mut version) != SUCCESS || version < MIN_NCCL_VERSION {
                return Err(format!(
                    "{path} is NCCL {}; ferry needs {} or newer",
                    version_string(version),
                    version_string(MIN_NCCL_VERSION)
                ));
            }
            let within = |e: String| format!("{path}: {e}");
            Ok(NcclLib {
                get_unique_id: sym(handle, c"ncclGetUniqueId").map_err(within)?,
                comm_init_rank_config: sym(handle, c"ncclCommInitRankConfig").map_err(within)?,
                comm_get_async_error: sym(handle, c"ncclCommGetAsyncError").map_err(within)?,
                comm_finalize: sym(handle, c"ncclCommFinalize").map_err(within)?,
                comm_destroy: sym(handle, c"ncclCommDestroy").map_err(within)?,
                comm_abort: sym(handle, c"ncclCommAbort").map_err(within)?,
                all_reduce: sym(handle, c"ncclAllReduce").map_err(within)?,
                broadcast: sym(handle, c"ncclBroadcast").map_err(within)?,
                all_gather: sym(handle, c"ncclAllGather").map_err(within)?,
                get_error_string: sym(handle, c"ncclGetErrorString").map_err(within)?,
                get_last_error: sym(handle, c"ncclGetLastError").map_err(within)?,
                path,
                version,
            })
        }
    }
}

/// The NCCL library of this process, loaded on first use (see the module docs).
fn nccl_lib() -> Result<&'static NcclLib, String> {
    static NCCL: OnceLock<Result<NcclLib, String>> = OnceLock::new();
    NCCL.get_or_init(|| {
        let handle = open_nccl(std::env::var_os(NCCL_LIB_ENV))?;
        // SAFETY: a library that dlopen accepted under NCCL's name; never closed.
        unsafe { NcclLib::resolve(handle) }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Everything the backend needs, or why it cannot run here. Touches cudarc not at all.
fn ready() -> Result<&'static NcclLib, CollectiveError> {
    let unavailable = |message: String| CollectiveError::Unavailable { message };
    // tch panics if libtorch throws; availability must never panic.
    if !catch_unwind(tch::Cuda::is_available).unwrap_or(false) {
        return Err(unavailable("libtorch sees no CUDA device".into()));
    }
    // cudarc's driver loader tries libcuda.so, ..., libcuda.so.1 and panics if none opens.
    static DRIVER: OnceLock<bool> = OnceLock::new();
    let driver = DRIVER.get_or_init(|| {
        ["libcuda.so.1", "libcuda.so"]
            .iter()
            .any(|name| dlopen_name(name, libc::RTLD_LAZY | libc::RTLD_LOCAL).is_ok())
    });
    if !driver {
        return Err(unavailable(
            "the CUDA driver library (libcuda.so.1) cannot be opened".into(),
        ));
    }
    nccl_lib().map_err(unavailable)
}

fn cuda_device_count() -> usize {
    catch_unwind(tch::Cuda::device_count)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// Opens NCCL from the first place that has it, with `RTLD_NOW | RTLD_GLOBAL`; `explicit` is
/// the value of `FERRY_NCCL_LIB`.
fn open_nccl(explicit: Option<std::ffi::OsString>) -> Result<*mut c_void, String> {
    let flags = libc::RTLD_NOW | libc::RTLD_GLOBAL;
    if let Some(value) = explicit.filter(|v| !v.is_empty()) {
        let given = PathBuf::from(&value);
        let files = if given.is_dir() {
            vec![given.join(NCCL_SONAME), given.join("libnccl.so")]
        } else {
            vec![given]
        };
        let mut errors = Vec::new();
        for file in &files {
            match dlopen_path(file, flags) {
                Ok(handle) => return Ok(handle),
                Err(e) => errors.push(e),
            }
        }
        return Err(format!(
            "{NCCL_LIB_ENV}={}: {}",
            value.to_string_lossy(),
            errors.join("; ")
        ));
    }
    // The copy libtorch_cuda.so linked against, when it is already loaded.
    if let Ok(handle) = dlopen_name(NCCL_SONAME, flags | libc::RTLD_NOLOAD) {
        return Ok(handle);
    }
    let mut tried = Vec::new();
    for file in candidate_files() {
        if !file.exists() {
            continue;
        }
        match dlopen_path(&file, flags) {
            Ok(handle) => return Ok(handle),
            Err(e) => tried.push(e),
        }
    }
    for name in [NCCL_SONAME, "libnccl.so"] {
        match dlopen_name(name, flags) {
            Ok(handle) => return Ok(handle),
            Err(e) => tried.push(e),
        }
    }
    Err(format!(
        "no usable NCCL library (tried: {}); install the CUDA build of torch (its \
         nvidia-nccl wheel), or set {NCCL_LIB_ENV} to libnccl.so.2 or its directory",
        tried.join("; ")
    ))
}

/// `libnccl.so.2` / `libnccl.so` in the wheel's nvidia/nccl/lib next to libtorch, libtorch's
/// own directory, and every `LD_LIBRARY_PATH` directory, in that order, without duplicates.
fn candidate_files() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for torch_lib in libtorch_dirs() {
        // site-packages/torch/lib -> site-packages/nvidia/nccl/lib
        if let Some(site_packages) = torch_lib.parent().and_then(Path::parent) {
            dirs.push(site_packages.join("nvidia/nccl/lib"));
        }
        dirs.push(torch_lib);
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|d| !d.as_os_str().is_empty()));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        for name in [NCCL_SONAME, "libnccl.so"] {
            let file = dir.join(name);
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    files
}

/// Directories (symlinks resolved) of the libtorch libraries loaded in this process.
fn libtorch_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for object in loaded_objects() {
        let is_torch = object.file_name().and_then(OsStr::to_str).is_some_and(|n| {
            matches!(
                n,
                "libtorch_cpu.so" | "libc10.so" | "libtorch.so" | "libtorch_cuda.so"
            )
        });
        if !is_torch {
            continue;
        }
        let real = std::fs::canonicalize(&object).unwrap_or(object);
        if let Some(dir) = real.parent() {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    dirs
}

/// Paths of the shared objects loaded in this process.
fn loaded_objects() -> Vec<PathBuf> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: glibc passes a valid info; `data` is the Vec below. Nothing here panics.
        unsafe {
            let out = &mut *data.cast::<Vec<PathBuf>>();
            let name = (*info).dlpi_name;
            if !name.is_null() {
                let bytes = CStr::from_ptr(name).to_bytes();
                if !bytes.is_empty() {
                    out.push(PathBuf::from(OsStr::from_bytes(bytes)));
                }
            }
        }
        0
    }
    let mut out: Vec<PathBuf> = Vec::new();
    // SAFETY: the callback only appends to `out`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&mut out as *mut Vec<PathBuf>).cast()) };
    out
}

fn dlopen_path(path: &Path, flags: c_int) -> Result<*mut c_void, String> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: NUL in path", path.display()))?;
    dlopen_c(&c, flags)
}

fn dlopen_name(name: &str, flags: c_int) -> Result<*mut c_void, String> {
    dlopen_c(
        &CString::new(name).expect("no NUL in a library name"),
        flags,
    )
}

fn dlopen_c(name: &CStr, flags: c_int) -> Result<*mut c_void, String> {
    // SAFETY: a NUL-terminated name; the handle is never closed.
    let handle = unsafe { libc::dlopen(name.as_ptr(), flags) };
    if !handle.is_null() {
        return Ok(handle);
    }
    // SAFETY: dlerror returns a thread-local message or null.
    let reason = unsafe { libc::dlerror() };
    Err(if reason.is_null() {
        format!("{}: cannot be opened", name.to_string_lossy())
    } else {
        // SAFETY: non-null dlerror result is a NUL-terminated string.
        unsafe { CStr::from_ptr(reason) }
            .to_string_lossy()
            .into_owned()
    })
}

/// The file of the loaded object that holds `addr`.
fn symbol_file(addr: *const c_void) -> Option<String> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out-parameter; dladdr only reads the loader's tables.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-null dli_fname is a NUL-terminated string owned by the loader.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    Some(std::fs::canonicalize(&path).map_or(path, |p| p.display().to_string()))
}

/// The device's primary context (shared with libtorch), its legacy default stream, and the
/// completion event. cudarc's loader panics when a library or symbol is missing, so this
/// first use runs under `catch_unwind`, and it exercises every driver entry point the
/// backend calls later (bind, event record and query).
fn cuda_objects(
    device: usize,
) -> Result<(Arc<CudaContext>, Arc<CudaStream>, CudaEvent), CollectiveError> {
    let made = catch_unwind(AssertUnwindSafe(|| -> Result<_, DriverError> {
        let ctx = CudaContext::new(device)?; // retains the primary context and makes it current
        let stream = ctx.default_stream();
        let done = ctx.new_event(None)?; // CU_EVENT_DISABLE_TIMING: cheapest to record and query
        done.record(&stream)?;
        done.try_is_complete()?;
        ctx.bind_to_thread()?;
        Ok((ctx, stream, done))
    }));
    match made {
        Ok(Ok(objects)) => Ok(objects),
        Ok(Err(e)) => Err(cuda_err(
            "communicator init",
            "setting up the CUDA context",
            e,
        )),
        Err(panic) => Err(CollectiveError::Unavailable {
            message: format!(
                "cudarc could not use the CUDA driver: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            ),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// The NCCL data type an all-reduce sums `kind` as, if NCCL `version` can.
fn reduce_dtype(kind: Kind, version: c_int) -> Option<ncclDataType_t> {
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
fn nonblocking_config(lib_version: c_int, name: &CStr) -> ncclConfig_t {
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

/// 22907 -> "2.29.7" (codes before 2.9 were X*1000 + Y*100 + Z).
fn version_string(code: c_int) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

fn result_name(code: c_int) -> &'static str {
    use ncclResult_t::*;
    [
        (ncclSuccess, "ncclSuccess"),
        (ncclUnhandledCudaError, "ncclUnhandledCudaError"),
        (ncclSystemError, "ncclSystemError"),
        (ncclInternalError, "ncclInternalError"),
        (ncclInvalidArgument, "ncclInvalidArgument"),
        (ncclInvalidUsage, "ncclInvalidUsage"),
        (ncclRemoteError, "ncclRemoteError"),
        (ncclInProgress, "ncclInProgress"),
    ]
    .into_iter()
    .find(|&(r, _)| r as c_int == code)
    .map_or("unknown NCCL result", |(_, name)| name)
}

/// An NCCL failure of `op` with `code`, with NCCL's own description and last error message.
fn nccl_error(lib: &NcclLib, op: &'static str, code: c_int) -> CollectiveError {
    let text = |p: *const c_char| {
        (!p.is_null())
            // SAFETY: NCCL returns static or thread-local NUL-terminated strings.
            .then(|| {
                unsafe { CStr::from_ptr(p) }
                    .to_string_lossy()
                    .trim()
                    .to_string()
            })
            .filter(|s| !s.is_empty())
    };
    // SAFETY: both accept any code / a null communicator (ncclGetLastError ignores it).
    let what = text(unsafe { (lib.get_error_string)(code) });
    let last = text(unsafe { (lib.get_last_error)(std::ptr::null_mut()) });
    let mut message = format!("{} ({code})", result_name(code));
    if let Some(what) = what {
        message += &format!(": {what}");
    }
    if let Some(last) = last {
        message += &format!("; last NCCL error: {last}");
    }
    nccl_err(op, message)
}

fn nccl_err(op: &'static str, message: String) -> CollectiveError {
    CollectiveError::Nccl { op, message }
}

fn cuda_err(op: &'static str, doing: &str, e: DriverError) -> CollectiveError {
    nccl_err(op, format!("{doing}: CUDA driver error {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GroupSpec {
        GroupSpec {
            rank: 0,
            world_size: 2,
            peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            generation: 1,
            job_token: "t".into(),
            timeout: Duration::from_secs(5),
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
                let cudarc_would_find =
                    dlopen_name("libnccl.so", libc::RTLD_LAZY | libc::RTLD_NOLOAD);
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
}
