// The targets link libtorch through ferry-engine: find it at run time without
// LD_LIBRARY_PATH, as the `ferry` binary does (build-support/libtorch_rpath.rs), but without
// forcing libtorch_cuda in.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
