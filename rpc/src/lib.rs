//! The coordinator's protocol: the code generated from `proto/ferry.proto` ([`proto`]) and an
//! authenticated client of it ([`client`]), for workers, the CLI and tests.

pub mod client;

/// Code generated from `proto/ferry.proto`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("ferry.v1");
}
