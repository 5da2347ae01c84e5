// Shared by the build scripts of the crates that compile C++ shims against libtorch (included
// with `include!`): tch exposes neither autocast, the fused AdamW kernel nor gradient hooks.

/// Compiles `files` (paths under the crate) into the static library `name`, against the
/// libtorch headers tch uses. Without libtorch (DEP_TCH_LIBTORCH_LIB unset) it does nothing.
fn compile_against_libtorch(name: &str, files: &[&str]) {
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let include = std::path::Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or("1".into())
        ))
        .files(files)
        .compile(name);
}
