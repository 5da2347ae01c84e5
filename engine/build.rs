include!("../build-support/libtorch_rpath.rs");

fn main() {
    emit_libtorch_link_args();
    compile_shims();
}

/// Builds csrc/*.cpp (bf16 autocast, fused AdamW) against the libtorch headers tch
/// uses.
fn compile_shims() {
    println!("cargo:rerun-if-changed=csrc/autocast_bf16.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
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
        .file("csrc/autocast_bf16.cpp")
        .file("csrc/fused_adamw.cpp")
        .compile("ferry_shims");
}
