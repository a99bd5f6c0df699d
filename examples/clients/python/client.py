"""Gets OAuth tokens from tokengate over gRPC, the way a Python backend would.

It asks for a token with the default client, then with a named client and a JWT bearer
grant; honours RetryInfo once; handles a resource server's 401 by asking again with
`rejected_access_token`; and shows what two failures carry (ErrorInfo, RetryInfo,
BadRequest), decoded with grpcio-status. Each outcome is printed as one `event key=value`
line; tokens are shown only as a SHA-256 prefix.

    RC_JWT=<jwt> python client.py --addr 127.0.0.1:50051 --client-id my-app
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Generated from proto/tokengate/v1/token.proto by grpcio-tools (see README.md).
from tokengate.v1 import token_pb2, token_pb2_grpc

CALL_TIMEOUT_S = 10.0
# A longer wait than this is not worth holding a request for; give up instead.
MAX_RETRY_WAIT_S = 60.0
# An unsigned JWT: the upstream refuses it, which shows an OAuth error's details.
UNSIGNED_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZW1vIn0."
_BARE = re.compile(r'[^\s"=\\]+')


def emit(event: str, **fields) -> None:
    """Prints one line: the event, then key=value pairs (JSON-quoted when needed)."""
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text if _BARE.fullmatch(text) else json.dumps(text)}")
    print(" ".join(parts), flush=True)


def fingerprint(token: str) -> str:
    """Enough to tell tokens apart in a log without printing one."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def describe_failure(step: str, err: grpc.RpcError) -> float | None:
    """Prints the status and its google.rpc details; returns RetryInfo's delay, if any."""
    emit("failure", step=step, code=err.code().name, message=err.details() or "")
    status = rpc_status.from_call(err)
    if status is None:
        return None
    delay = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            # `reason` is stable; act on it. The metadata says why, for logs and support.
            emit("error_info", step=step, domain=info.domain, reason=info.reason)
            for key in sorted(info.metadata):
                emit("metadata", step=step, key=key, value=info.metadata[key])
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
            emit("retry_info", step=step, delay_ms=round(delay * 1000))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                emit(
                    "field_violation",
                    step=step,
                    field=violation.field,
                    description=violation.description,
                )
    return delay


def get_token(stub, step: str, request) -> token_pb2.GetTokenResponse | None:
    """GetToken; when the failure carries RetryInfo, waits that long and tries once more."""
    for attempt in (1, 2):
        try:
            response = stub.GetToken(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            delay = describe_failure(step, err)
            if attempt == 2 or delay is None or delay > MAX_RETRY_WAIT_S:
                return None
            emit("retry", step=step, delay_ms=round(delay * 1000))
            time.sleep(delay)
            continue
        emit(
            "token",
            step=step,
            source=token_pb2.TokenSource.Name(response.source),
            sha256=fingerprint(response.access_token),
            expires_in_s=response.expires_in.seconds,
        )
        return response
    return None


def call_api(step: str, url: str, access_token: str) -> int:
    """GETs the resource server with the token; returns the HTTP status."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {access_token}"})
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    emit("api", step=step, status=status, sha256=fingerprint(access_token))
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("TOKENGATE_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--client-id", default=os.environ.get("TOKENGATE_CLIENT_ID"))
    parser.add_argument(
        "--api-url",
        default=os.environ.get(
            "API_URL", "https://platform.ringcentral.com/restapi/v1.0/account/~/extension/~"
        ),
    )
    args = parser.parse_args()
    jwt = os.environ.get("RC_JWT")  # a credential: from the environment, never a flag
    if not args.client_id or not jwt:
        parser.error("--client-id (or TOKENGATE_CLIENT_ID) and RC_JWT are required")

    with grpc.insecure_channel(args.addr) as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)

        # 1. The default client: name no client_id, set the grant's oneof arm.
        default_request = token_pb2.GetTokenRequest(
            client_credentials=token_pb2.ClientCredentialsGrant()
        )
        if get_token(stub, "default", default_request) is None:
            return 1

        # 2. A named client with a JWT bearer grant (RingCentral's JWT flow).
        jwt_request = token_pb2.GetTokenRequest(
            client_id=args.client_id, jwt_bearer=token_pb2.JwtBearerGrant(assertion=jwt)
        )
        token = get_token(stub, "named", jwt_request)
        if token is None:
            return 1

        # 3. The API refused the token before it expired: ask again, naming the refused token,
        #    so tokengate drops it for every caller and fetches one fresh token.
        if call_api("named", args.api_url, token.access_token) == 401:
            again = token_pb2.GetTokenRequest()
            again.CopyFrom(jwt_request)
            again.rejected_access_token = token.access_token
            token = get_token(stub, "renewed", again)
            if token is None:
                return 1
            call_api("renewed", args.api_url, token.access_token)

        # 4. What failures carry: an OAuth error from the upstream, and a request refused
        #    locally with the offending field named.
        get_token(
            stub,
            "bad_jwt",
            token_pb2.GetTokenRequest(
                client_id=args.client_id,
                jwt_bearer=token_pb2.JwtBearerGrant(assertion=UNSIGNED_JWT),
            ),
        )
        get_token(
            stub,
            "bad_scope",
            token_pb2.GetTokenRequest(
                client_credentials=token_pb2.ClientCredentialsGrant(),
                scopes=["ReadAccounts SMS"],  # one scope per entry; this one is refused
            ),
        )
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
