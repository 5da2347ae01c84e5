// Generates the gRPC code for proto/ferry.proto. protoc comes from the protoc-bin-vendored
// crate, so building needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../proto/ferry.proto");
    tonic_prost_build::configure().compile_protos(&["../proto/ferry.proto"], &["../proto"])?;
    Ok(())
}
