// Shared by the build scripts of every crate that links libtorch (included with `include!`).
//
// torch-sys (links = "tch") tells its direct dependents where libtorch lives (DEP_TCH_LIBTORCH_LIB).
// We bake that directory into the rpath of every binary and test of the crate, so `ferry`
// runs without LD_LIBRARY_PATH. The wheel's own libraries find their CUDA/NCCL siblings
// through their own $ORIGIN rpaths.
//
// Rust links with --as-needed, which would drop libtorch_cuda.so because no symbol of it is
// referenced directly; then CUDA would silently be unavailable on GPU machines. Linking it
// with --no-as-needed keeps the GPU path in the default build, selected at run time.
fn emit_libtorch_link_args() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
