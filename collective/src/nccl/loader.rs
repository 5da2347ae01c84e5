//! Finding and loading NCCL, and probing the CUDA driver (see "How libnccl is found, and why
//! not by cudarc" in the [module docs](super)).

use super::{
    cuda_err, CollectiveError, Stream, MIN_NCCL_VERSION, NCCL_LIB_ENV, NCCL_SONAME, SUCCESS,
};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

// ---------------------------------------------------------------------------------------
// Finding and loading the libraries.

/// NCCL's entry points. Results are raw `c_int`s rather than cudarc's `ncclResult_t`: a code
/// this build does not know (a newer NCCL) must not become an invalid Rust enum value.
pub(super) struct NcclLib {
    /// The file the symbols came from.
    pub(super) path: String,
    /// `ncclGetVersion`: 22907 for 2.29.7.
    pub(super) version: c_int,
    pub(super) get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    pub(super) comm_init_rank_config: unsafe extern "C" fn(
        *mut ncclComm_t,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int,
    pub(super) comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    pub(super) comm_finalize: unsafe extern "C" fn(ncclComm_t) -> c_int,
    pub(super) comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    pub(super) comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    /// (send, recv, count, datatype, op, comm, stream)
    pub(super) all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    /// (send, recv, count, datatype, root, comm, stream)
    pub(super) broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    /// (send, recv, count per rank, datatype, comm, stream)
    pub(super) all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, ncclComm_t, Stream) -> c_int,
    pub(super) get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    pub(super) get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
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
pub(super) fn nccl_lib() -> Result<&'static NcclLib, String> {
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
pub(super) fn ready() -> Result<&'static NcclLib, CollectiveError> {
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

pub(super) fn cuda_device_count() -> usize {
    catch_unwind(tch::Cuda::device_count)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// Opens NCCL from the first place that has it, with `RTLD_NOW | RTLD_GLOBAL`; `explicit` is
/// the value of `FERRY_NCCL_LIB`.
pub(super) fn open_nccl(explicit: Option<std::ffi::OsString>) -> Result<*mut c_void, String> {
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
pub(super) fn candidate_files() -> Vec<PathBuf> {
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
pub(super) fn libtorch_dirs() -> Vec<PathBuf> {
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

pub(super) fn dlopen_name(name: &str, flags: c_int) -> Result<*mut c_void, String> {
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
pub(super) fn cuda_objects(
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

/// 22907 -> "2.29.7" (codes before 2.9 were X*1000 + Y*100 + Z).
pub(super) fn version_string(code: c_int) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}
