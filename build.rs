//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed) into `OUT_DIR`,
//! and keeps the encoded descriptor set for gRPC reflection.

use prost::Message as _;

/// Every generated type gets no derived `Debug` unless it is listed here: these carry no
/// credential or token, so deriving is safe. A new message therefore redacts by default
/// (its `Debug` must be written in `src/proto.rs`) instead of leaking until someone notices.
const DERIVED_DEBUG: &[&str] = &[
    ".tokengate.v1.GetTokenRequest.grant",
    ".tokengate.v1.ClientCredentialsGrant",
    ".tokengate.v1.BrandSubject",
    ".tokengate.v1.GuestGrant",
    ".tokengate.v1.DeviceCertificateGrant",
    ".tokengate.v1.RevokeTokenResponse",
    ".tokengate.v1.TokenSource",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["tokengate/v1/token.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tokengate_descriptor.bin"), fds.encode_to_vec())?;
    let mut build = tonic_prost_build::configure().skip_debug(["."]);
    for path in DERIVED_DEBUG {
        build = build.type_attribute(path, "#[derive(Debug)]");
    }
    build.compile_fds(fds)?;
    Ok(())
}
