//! The one request and the one upstream answer every benchmark run uses, so that runs compare.
//!
//! They are shaped like RingCentral's JWT flow: a ~600-byte user JWT in, a ~1 KB token out.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use tokengate::proto::{
    ClientCredentialsGrant, GetTokenRequest, GetTokenResponse, JwtBearerGrant,
    client_credentials_grant, get_token_request,
};

/// The registered client the benchmark config declares (cached by the broker; the default).
pub const CLIENT_ID: &str = "bench-app";

/// Marks the tokens a rotating upstream issues, so it can tell a reused one from a foreign one.
pub const ROTATED_MARK: &str = "R0TATED";

/// Deterministic filler, so the fixtures are the same in every run without a random crate.
fn filler(len: usize, seed: u32) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            ALPHABET[(state >> 16) as usize % ALPHABET.len()] as char
        })
        .collect()
}

/// A JWT the way a backend would hold one: RS256 header, real claims, a 2048-bit-sized signature.
pub fn user_jwt() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT","kid":"bench-key-1"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        r#"{"aud":"https://platform.ringcentral.com/restapi/oauth/token","iss":"bench-app","sub":"400131234008","exp":4102444800,"iat":1764144000,"jti":"6f1c2a9e-4b7d-4a53-9c1e-2f8d7b6a5e40"}"#,
    );
    format!("{header}.{claims}.{}", filler(342, 7))
}

/// The GetToken request sent by every gRPC run, for `client_id`: RingCentral's JWT flow.
pub fn get_token_request(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(get_token_request::Grant::JwtBearer(JwtBearerGrant {
            assertion: user_jwt(),
        })),
        client_id: client_id.to_owned(),
        ..GetTokenRequest::default()
    }
}

/// A client_credentials request for one account: distinct accounts are distinct cache entries.
pub fn client_credentials_request(client_id: &str, account_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(get_token_request::Grant::ClientCredentials(
            ClientCredentialsGrant {
                subject: Some(client_credentials_grant::Subject::AccountId(
                    account_id.to_owned(),
                )),
            },
        )),
        client_id: client_id.to_owned(),
        ..GetTokenRequest::default()
    }
}

/// `request` as one gRPC length-prefixed message: flag 0 (uncompressed), big-endian length, bytes.
pub fn grpc_frame(request: &impl prost::Message) -> Vec<u8> {
    let body = request.encode_to_vec();
    let len = u32::try_from(body.len()).expect("a benchmark request is far below 4 GiB");
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The upstream's answer to every token POST: RingCentral's field set, about 1 KB.
pub fn token_json() -> String {
    token_json_lasting(3600)
}

/// [`token_json`] with another `expires_in` (seconds).
pub fn token_json_lasting(expires_in: u64) -> String {
    token_json_with(
        format!("U0pDMTFQMDFQQVMwMHxBQUFW{}", filler(700, 11)),
        format!("U0pDMTFQMDFQQVMwMHxBQUJ{}", filler(130, 13)),
        expires_in,
    )
}

/// The `serial`th token of a rotating upstream: the same shape and sizes as [`token_json`],
/// with access and refresh tokens of their own. Returns the JSON and the refresh token.
pub fn rotated_token_json(serial: u64, expires_in: u64) -> (String, String) {
    let tag = format!("{ROTATED_MARK}{serial:012}");
    let access = format!(
        "U0pDMTFQMDFQQVMwMHxBQUFW{tag}{}",
        filler(700 - tag.len(), 11)
    );
    let refresh = format!(
        "U0pDMTFQMDFQQVMwMHxBQUJ{tag}{}",
        filler(130 - tag.len(), 13)
    );
    (
        token_json_with(access, refresh.clone(), expires_in),
        refresh,
    )
}

fn token_json_with(access_token: String, refresh_token: String, expires_in: u64) -> String {
    serde_json::json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "refresh_token": refresh_token,
        "refresh_token_expires_in": 604_800,
        "scope": "ReadAccounts ReadCallLog ReadMessages SMS CallControl",
        "owner_id": "400131234008",
        "endpoint_id": "p7GZlEVHRwKrxMfN3_W2Cg"
    })
    .to_string()
}

/// What the echo answers: the same token, as tokengate would type it.
pub fn canned_response() -> GetTokenResponse {
    let json: serde_json::Value =
        serde_json::from_str(&token_json()).expect("token_json is valid JSON");
    let text = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
    let seconds = |key: &str| Some(prost_types_duration(json[key].as_i64().unwrap_or_default()));
    GetTokenResponse {
        access_token: text("access_token"),
        token_type: text("token_type"),
        expires_in: seconds("expires_in"),
        refresh_token: text("refresh_token"),
        refresh_token_expires_in: seconds("refresh_token_expires_in"),
        scopes: text("scope").split(' ').map(str::to_owned).collect(),
        owner_id: text("owner_id"),
        endpoint_id: text("endpoint_id"),
        ..GetTokenResponse::default()
    }
}

fn prost_types_duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn the_frame_is_length_prefixed_protobuf() {
        let frame = grpc_frame(&get_token_request(CLIENT_ID));
        assert_eq!(frame[0], 0);
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        let decoded = GetTokenRequest::decode(&frame[5..]).unwrap();
        assert_eq!(decoded.client_id, CLIENT_ID);
    }

    #[test]
    fn rotated_tokens_differ_and_keep_the_sizes() {
        let (one, refresh_one) = rotated_token_json(1, 20);
        let (two, refresh_two) = rotated_token_json(2, 20);
        assert_ne!(refresh_one, refresh_two);
        assert_eq!(one.len(), two.len());
        assert_eq!(one.len(), token_json_lasting(20).len());
        let one: serde_json::Value = serde_json::from_str(&one).unwrap();
        assert_eq!(one["refresh_token"], refresh_one.as_str());
        assert!(refresh_one.contains(ROTATED_MARK));
    }

    #[test]
    fn the_fixtures_have_realistic_sizes() {
        let token = token_json();
        assert!((900..1200).contains(&token.len()), "{}", token.len());
        let jwt = user_jwt();
        assert!((500..800).contains(&jwt.len()), "{}", jwt.len());
        assert_eq!(
            tokengate::grant::jwt_subject(&jwt).as_deref(),
            Some("400131234008")
        );
    }
}
