// Gets OAuth tokens from tokengate over gRPC, the way a Node backend would.
//
// It asks for a token with the default client, then with a named client and a JWT bearer
// grant; honours RetryInfo once; handles a resource server's 401 by asking again with
// rejected_access_token; and shows what two failures carry (ErrorInfo, RetryInfo,
// BadRequest), decoded from grpc-status-details-bin with protobufjs. Each outcome is printed
// as one "event key=value" line; tokens are shown only as a SHA-256 prefix.
//
//   RC_JWT=<jwt> node client.js --addr 127.0.0.1:50051 --client-id my-app

import { createHash } from 'node:crypto';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const here = path.dirname(fileURLToPath(import.meta.url));
// tokengate's API, loaded at run time (no generated code). Copy token.proto beside your
// client and point this at it.
const TOKENGATE_PROTO_DIR = process.env.TOKENGATE_PROTO_DIR ?? path.join(here, '../../../proto');
const CALL_TIMEOUT_MS = 10_000;
// A longer wait than this is not worth holding a request for; give up instead.
const MAX_RETRY_WAIT_MS = 60_000;
// An unsigned JWT: the upstream refuses it, which shows an OAuth error's details.
const UNSIGNED_JWT = 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZW1vIn0.';

// keepCase: the proto's field names (client_id, jwt_bearer), as every other language uses.
const api = protoLoader.loadSync('tokengate/v1/token.proto', {
  includeDirs: [TOKENGATE_PROTO_DIR],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { TokenService } = grpc.loadPackageDefinition(api).tokengate.v1;

// google.rpc.Status and its details, from the copies in proto/google/rpc (googleapis).
const rpc = new protobuf.Root().loadSync(
  ['status.proto', 'error_details.proto'].map((f) => path.join(here, 'proto/google/rpc', f)),
  { keepCase: true },
);
const Status = rpc.lookupType('google.rpc.Status');

/** Prints one line: the event, then key=value pairs (JSON-quoted when needed). */
function emit(event, fields = {}) {
  const parts = [event];
  for (const [key, value] of Object.entries(fields)) {
    const text = String(value);
    parts.push(`${key}=${/^[^\s"=\\]+$/.test(text) ? text : JSON.stringify(text)}`);
  }
  console.log(parts.join(' '));
}

/** Enough to tell tokens apart in a log without printing one. */
const fingerprint = (token) => createHash('sha256').update(token).digest('hex').slice(0, 12);

/** The google.rpc details of a failed call, each as a plain object named by its type. */
function statusDetails(err) {
  const [raw] = err.metadata?.get('grpc-status-details-bin') ?? [];
  if (!raw) return [];
  return Status.decode(raw).details.map((any) => {
    const type = rpc.lookupType(any.type_url.slice(any.type_url.lastIndexOf('/') + 1));
    return { type: type.fullName, ...type.toObject(type.decode(any.value), { longs: Number }) };
  });
}

/** Prints the status and its details; returns RetryInfo's delay in ms, or undefined. */
function describeFailure(step, err) {
  emit('failure', { step, code: grpc.status[err.code], message: err.details ?? '' });
  let delayMs;
  for (const detail of statusDetails(err)) {
    switch (detail.type) {
      case '.google.rpc.ErrorInfo': {
        // reason is stable; act on it. The metadata says why, for logs and support.
        emit('error_info', { step, domain: detail.domain, reason: detail.reason });
        const metadata = detail.metadata ?? {};
        for (const key of Object.keys(metadata).sort()) {
          emit('metadata', { step, key, value: metadata[key] });
        }
        break;
      }
      case '.google.rpc.RetryInfo': {
        const { seconds = 0, nanos = 0 } = detail.retry_delay ?? {};
        delayMs = Math.round(seconds * 1000 + nanos / 1e6);
        emit('retry_info', { step, delay_ms: delayMs });
        break;
      }
      case '.google.rpc.BadRequest':
        for (const v of detail.field_violations ?? []) {
          emit('field_violation', { step, field: v.field, description: v.description });
        }
        break;
    }
  }
  return delayMs;
}

/** GetToken; when the failure carries RetryInfo, waits that long and tries once more. */
async function getToken(client, step, request) {
  for (let attempt = 1; ; attempt++) {
    try {
      const response = await new Promise((resolve, reject) =>
        client.GetToken(request, { deadline: Date.now() + CALL_TIMEOUT_MS }, (err, res) =>
          err ? reject(err) : resolve(res),
        ),
      );
      emit('token', {
        step,
        source: response.source,
        sha256: fingerprint(response.access_token),
        expires_in_s: response.expires_in?.seconds ?? 0,
      });
      return response;
    } catch (err) {
      if (err.code === undefined) throw err; // not a gRPC status
      const delayMs = describeFailure(step, err);
      if (attempt === 2 || delayMs === undefined || delayMs > MAX_RETRY_WAIT_MS) return undefined;
      emit('retry', { step, delay_ms: delayMs });
      await sleep(delayMs);
    }
  }
}

/** GETs the resource server with the token; returns the HTTP status. */
async function callApi(step, url, accessToken) {
  const response = await fetch(url, {
    headers: { authorization: `Bearer ${accessToken}` },
    signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
  });
  await response.arrayBuffer();
  emit('api', { step, status: response.status, sha256: fingerprint(accessToken) });
  return response.status;
}

async function main() {
  const { values } = parseArgs({
    options: {
      addr: { type: 'string', default: process.env.TOKENGATE_ADDR ?? '127.0.0.1:50051' },
      'client-id': { type: 'string', default: process.env.TOKENGATE_CLIENT_ID },
      'api-url': {
        type: 'string',
        default:
          process.env.API_URL ?? 'https://platform.ringcentral.com/restapi/v1.0/account/~/extension/~',
      },
    },
  });
  const clientId = values['client-id'];
  const jwt = process.env.RC_JWT; // a credential: from the environment, never a flag
  if (!clientId || !jwt) {
    console.error('--client-id (or TOKENGATE_CLIENT_ID) and RC_JWT are required');
    return 2;
  }

  const client = new TokenService(values.addr, grpc.credentials.createInsecure());
  try {
    // 1. The default client: name no client_id, set the grant's oneof arm.
    if (!(await getToken(client, 'default', { client_credentials: {} }))) return 1;

    // 2. A named client with a JWT bearer grant (RingCentral's JWT flow).
    const jwtRequest = { client_id: clientId, jwt_bearer: { assertion: jwt } };
    let token = await getToken(client, 'named', jwtRequest);
    if (!token) return 1;

    // 3. The API refused the token before it expired: ask again, naming the refused token,
    //    so tokengate drops it for every caller and fetches one fresh token.
    if ((await callApi('named', values['api-url'], token.access_token)) === 401) {
      token = await getToken(client, 'renewed', {
        ...jwtRequest,
        rejected_access_token: token.access_token,
      });
      if (!token) return 1;
      await callApi('renewed', values['api-url'], token.access_token);
    }

    // 4. What failures carry: an OAuth error from the upstream, and a request refused
    //    locally with the offending field named.
    await getToken(client, 'bad_jwt', { client_id: clientId, jwt_bearer: { assertion: UNSIGNED_JWT } });
    await getToken(client, 'bad_scope', {
      client_credentials: {},
      scopes: ['ReadAccounts SMS'], // one scope per entry; this one is refused
    });
  } finally {
    client.close();
  }
  emit('done');
  return 0;
}

process.exitCode = await main();
