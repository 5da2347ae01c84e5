include!("../build-support/libtorch_rpath.rs");
include!("../build-support/libtorch_shims.rs");

fn main() {
    emit_libtorch_link_args();
    // libtorch's post-accumulate-grad hook, for the all-reduce that overlaps backward.
    compile_against_libtorch("ferry_grad_hooks", &["csrc/grad_hooks.cpp"]);
}
