//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed) into `OUT_DIR`,
//! and keeps the encoded descriptor set for gRPC reflection.

use prost::Message as _;

/// Messages that carry credentials or tokens: their `Debug` is written by hand in
/// `src/proto.rs` so that no derived impl can print a secret.
const REDACTED_DEBUG: &[&str] = &[
    ".tokengate.v1.AuthorizationCodeGrant",
    ".tokengate.v1.PasswordGrant",
    ".tokengate.v1.JwtBearerGrant",
    ".tokengate.v1.PartnerJwtGrant",
    ".tokengate.v1.RefreshTokenGrant",
    ".tokengate.v1.IvrPinGrant",
    ".tokengate.v1.DeviceCodeGrant",
    ".tokengate.v1.OtpGrant",
    ".tokengate.v1.PersonalJwtGrant",
    ".tokengate.v1.ClientAssertion",
    ".tokengate.v1.GetTokenResponse",
    ".tokengate.v1.RevokeTokenRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["tokengate/v1/token.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tokengate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_debug(REDACTED_DEBUG.iter().copied())
        .compile_fds(fds)?;
    Ok(())
}
