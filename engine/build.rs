include!("../build-support/libtorch_rpath.rs");
include!("../build-support/libtorch_shims.rs");

fn main() {
    emit_libtorch_link_args();
    // bf16 autocast and the fused AdamW step.
    compile_against_libtorch(
        "ferry_shims",
        &["csrc/autocast_bf16.cpp", "csrc/fused_adamw.cpp"],
    );
}
