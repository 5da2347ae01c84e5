//! Aborting a communicator from another thread, and the communicator slot every NCCL call
//! goes through (see "Timeouts and aborts" in the [module docs](super)).

use super::loader::{nccl_lib, NcclLib};
use super::{nccl_error, CollectiveError, ABORT_HANDLE_WAIT, IN_PROGRESS, SUCCESS};
use cudarc::nccl::sys::ncclComm_t;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// Aborts a communicator from another thread; see the module docs. Clones share the flag.
#[derive(Clone)]
pub struct NcclAbortHandle {
    pub(super) shared: Arc<Shared>,
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
    ///
    /// [`NcclCollective::new_with_abort_handle`]: super::NcclCollective::new_with_abort_handle
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

    /// [`abort`](Self::abort) on a thread of its own, for callers that must not block: an
    /// async runtime's worker thread (heartbeats run there) would otherwise stall for as
    /// long as `ncclCommAbort` or a busy operation takes. The abort is requested before this
    /// returns. The thread's handle is returned for those who want to wait; `None` when no
    /// thread could be started, in which case the abort ran here.
    pub fn abort_in_background(&self) -> Option<std::thread::JoinHandle<()>> {
        self.shared.abort_requested.store(true, Ordering::SeqCst);
        let handle = self.clone();
        match std::thread::Builder::new()
            .name("nccl-abort".into())
            .spawn(move || handle.abort())
        {
            Ok(t) => Some(t),
            Err(_) => {
                self.abort();
                None
            }
        }
    }

    /// Whether `abort` has been called on this handle or a clone.
    pub fn abort_requested(&self) -> bool {
        self.shared.abort_requested.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// The communicator slot shared with abort handles.

/// The communicator pointer, or null before init and after abort/destroy. Only touched with
/// the lock held, so NCCL never sees the communicator from two threads at once.
pub(super) struct CommSlot {
    pub(super) comm: ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (the Mutex).
unsafe impl Send for CommSlot {}

pub(super) struct Shared {
    pub(super) abort_requested: AtomicBool,
    pub(super) slot: Mutex<CommSlot>,
}

pub(super) fn lock(m: &Mutex<CommSlot>) -> MutexGuard<'_, CommSlot> {
    // A panic while holding the lock leaves the slot consistent (the pointer is only ever
    // replaced whole), so poisoning is ignored.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `ncclCommAbort`s the communicator in `slot`, if any. Blocking: NCCL sets its abort flags
/// (kernels and proxy threads quit), waits for an unfinished init, and frees the communicator.
pub(super) fn abort_slot(slot: &mut CommSlot) {
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
pub(super) fn wait_async(
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
pub(super) fn async_state(lib: &NcclLib, comm: ncclComm_t) -> c_int {
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
pub(super) struct Backoff(Instant);

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff(Instant::now())
    }

    pub(super) fn pause(&self) {
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
