#!/usr/bin/env python3
"""A stand-in token endpoint on 127.0.0.1, for trying tokengate without RingCentral.

Answers POST /restapi/oauth/token with a RingCentral-shaped token for any grant except a
password grant whose password is "wrong", which gets RingCentral's invalid_grant error.
POST /restapi/oauth/revoke answers 200. Each request's form body is printed, secrets and all,
so run it only for local experiments.

    python3 scripts/fake-upstream.py 8080
"""

import json
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        form = dict(parse_qsl(self.rfile.read(length).decode()))
        print(f"{self.path} {form} authorization={self.headers.get('Authorization')}", flush=True)
        if self.path == "/restapi/oauth/revoke":
            return self.reply(200, None)
        if self.path != "/restapi/oauth/token":
            return self.reply(404, {"errors": [{"errorCode": "CMN-404", "message": "not found"}]})
        if form.get("grant_type") == "password" and form.get("password") == "wrong":
            return self.reply(400, {
                "error": "invalid_grant",
                "error_description": "Invalid resource owner credentials",
                "errors": [{"errorCode": "OAU-140", "message": "Invalid resource owner credentials"}],
            })
        self.reply(200, {
            "access_token": "U1BCMDFUMDRKV1MwMXxBQUJ" + secrets.token_hex(8),
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": "U1BCMDFUMDRKV1MwMXxSVDE" + secrets.token_hex(8),
            "refresh_token_expires_in": 604800,
            "scope": form.get("scope", "ReadAccounts"),
            "owner_id": "1001",
            "endpoint_id": "EP-local",
        })

    def reply(self, status, body):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("RCRequestId", "local-" + secrets.token_hex(4))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"fake upstream on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()
