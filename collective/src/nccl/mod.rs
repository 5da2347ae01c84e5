//! The NCCL backend of [`Collective`]: one communicator per generation, one process per GPU.
//!
//! Rank 0 makes an id with [`unique_id`], only when the coordinator asks it (once every member
//! of the forming group is there: each id starts a bootstrap thread in NCCL that lives until a
//! communicator uses it); it travels to the other ranks in the coordinator's Rendezvous blob;
//! every rank then calls [`NcclCollective::new`] with it. The peers' data-plane
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
//!
//! [`Collective`]: super::Collective
//! [`Collective::all_reduce_sum_after`]: super::Collective::all_reduce_sum_after
//! [`GroupSpec`]: super::GroupSpec

mod abort;
mod comm;
mod loader;
#[cfg(test)]
mod tests;

pub use abort::NcclAbortHandle;
pub use comm::{NcclCollective, NcclStreamMarker};

use super::CollectiveError;
use cudarc::driver::DriverError;
use cudarc::nccl::sys::{ncclConfig_t, ncclResult_t, ncclUniqueId};
use loader::{ready, NcclLib};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::time::Duration;

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

// ---------------------------------------------------------------------------------------
// Small helpers.

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
