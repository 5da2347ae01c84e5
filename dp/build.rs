include!("../build-support/libtorch_rpath.rs");

fn main() {
    emit_libtorch_link_args();
    compile_grad_hooks();
}

/// Builds csrc/grad_hooks.cpp (libtorch's post-accumulate-grad hook, for the all-reduce that
/// overlaps backward) against the libtorch headers tch uses.
fn compile_grad_hooks() {
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
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
        .file("csrc/grad_hooks.cpp")
        .compile("ferry_grad_hooks");
}
