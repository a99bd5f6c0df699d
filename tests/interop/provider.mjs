// A real OAuth 2.0 authorization server for tokengate's interop suite: panva's oidc-provider
// (OpenID-certified), configured at RingCentral's endpoint paths. Nobody on this project wrote
// its grant, client-authentication or error logic, which is the point: tokengate is proven
// against it, not against a mock that agrees with whoever wrote it.
//
// Started by tests/interop/test_interop.py; not meant for anything else.
//   node provider.mjs
// Environment:
//   INTEROP_JWT_CLIENTS  path of a JSON file: [{client_id, alg, jwks: {keys: [...]}}, ...], the
//                        private_key_jwt clients, whose key pairs the test generates at run time
// Binds 127.0.0.1 on a free port and prints one JSON line on stdout once it accepts requests:
//   {"listening":"http://127.0.0.1:PORT"}
// Everything else (oidc-provider's warnings, grant error details) goes to stderr.

import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import * as querystring from 'node:querystring';
import Provider, { errors } from 'oidc-provider';

// The paths RingCentral uses; tokengate's defaults (upstream.token_path / revoke_path) point here.
const TOKEN_PATH = '/restapi/oauth/token';
const REVOKE_PATH = '/restapi/oauth/revoke';
const DEVICE_AUTH_PATH = '/restapi/oauth/device';
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const JWT_BEARER_GRANT = 'urn:ietf:params:oauth:grant-type:jwt-bearer';

// Where the authorization-code client is sent back. Nothing listens on port 9: the test reads the
// Location header and never follows it.
const REDIRECT_URI = 'http://127.0.0.1:9/cb';

// RFC 8628 §3.2 `interval`: the minimum number of seconds between two polls of one device code.
// oidc-provider 9 defines errors.SlowDown but never raises it (it has no notion of a polling
// interval), so the middleware below enforces this interval and answers `slow_down` with the
// provider's own error class. 1 s keeps the suite fast.
const DEVICE_POLL_INTERVAL_S = 1;
// A device code that expires quickly, so `expired_token` can be observed (ttl.DeviceCode below).
const SHORT_DEVICE_CODE_TTL_S = 2;

// Credentials and values the test uses; the test module has the same constants.
const SECRETS = {
  'tg-basic': 'tg-basic-secret-0123456789',
  'tg-post': 'tg-post-secret-0123456789',
  'tg-wrong-secret': 'the-real-secret-0123456789',
  'tg-device-short': 'tg-device-short-secret-0123',
  'hs-client': 'a-client-secret-that-is-at-least-32-bytes-long',
  'caller-hs': 'caller-hs-secret-that-is-at-least-32-bytes-long',
};
const USER = { username: 'alice', password: 'wonderland' };
const OTP_CODE = '123456';
const JWT_BEARER_ASSERTION = 'interop-jwt-bearer-assertion';
const PARTNER_JWT_ASSERTION = 'interop-partner-jwt-assertion';

const ALL_GRANTS = [
  'client_credentials', 'authorization_code', 'refresh_token', DEVICE_GRANT,
  'password', 'otp', JWT_BEARER_GRANT, 'partner_jwt',
];

// Client metadata shared by every client that only does client_credentials.
const CC_ONLY = { grant_types: ['client_credentials'], redirect_uris: [], response_types: [] };

const jwtClients = process.env.INTEROP_JWT_CLIENTS
  ? JSON.parse(readFileSync(process.env.INTEROP_JWT_CLIENTS, 'utf8'))
  : [];

const clients = [
  // The workhorse: every grant tokengate is proven with, authenticated with HTTP Basic.
  {
    client_id: 'tg-basic',
    client_secret: SECRETS['tg-basic'],
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ALL_GRANTS,
    response_types: ['code'],
    redirect_uris: [REDIRECT_URI],
    scope: 'openid offline_access api billing',
  },
  // client_secret_post: the provider refuses Basic for it, so only a body secret works.
  {
    client_id: 'tg-post',
    client_secret: SECRETS['tg-post'],
    token_endpoint_auth_method: 'client_secret_post',
    ...CC_ONLY,
    grant_types: ['client_credentials', 'password', 'refresh_token'],
    scope: 'openid offline_access api billing',
  },
  // tokengate is configured with a different secret for this one.
  {
    client_id: 'tg-wrong-secret',
    client_secret: SECRETS['tg-wrong-secret'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...CC_ONLY,
    scope: 'api',
  },
  // Device flow with a device code that lives SHORT_DEVICE_CODE_TTL_S (ttl.DeviceCode below).
  {
    client_id: 'tg-device-short',
    client_secret: SECRETS['tg-device-short'],
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: [DEVICE_GRANT],
    redirect_uris: [],
    response_types: [],
    scope: 'openid api',
  },
  // client_secret_jwt, signed by tokengate with the shared secret.
  {
    client_id: 'hs-client',
    client_secret: SECRETS['hs-client'],
    token_endpoint_auth_method: 'client_secret_jwt',
    token_endpoint_auth_signing_alg: 'HS256',
    ...CC_ONLY,
    scope: 'api',
  },
  // client_secret_jwt with the assertion built by the gRPC caller, not by tokengate.
  {
    client_id: 'caller-hs',
    client_secret: SECRETS['caller-hs'],
    token_endpoint_auth_method: 'client_secret_jwt',
    token_endpoint_auth_signing_alg: 'HS256',
    ...CC_ONLY,
    scope: 'api',
  },
  // private_key_jwt clients: public keys generated by the test, one signing alg each.
  ...jwtClients.map(({ client_id: clientId, alg, jwks }) => ({
    client_id: clientId,
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: alg,
    jwks,
    ...CC_ONLY,
    scope: 'api',
  })),
];

// Binding first gives us the port, and the issuer must name it: client assertions are checked
// against it ("aud must be the issuer, the token endpoint URL or the endpoint URL").
const server = createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const ISSUER = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(ISSUER, {
  clients,
  routes: {
    token: TOKEN_PATH,
    revocation: REVOKE_PATH,
    device_authorization: DEVICE_AUTH_PATH,
    // The rest keep oidc-provider's defaults: /auth (authorization), /device (user code entry),
    // /interaction/:uid (devInteractions), /token/introspection (used by the test to prove that
    // the tokens tokengate hands out are live and belong to the right client).
  },
  scopes: ['openid', 'offline_access', 'api', 'billing'],
  features: {
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
    // Built-in login + consent pages, driven by the test with a cookie jar (any login works).
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  // RingCentral's refresh tokens are single-use; oidc-provider only rotates confidential clients'
  // refresh tokens late in their life by default, so rotate on every use. Reusing a rotated one is
  // then `invalid_grant` (and revokes the grant, as reuse detection should).
  rotateRefreshToken: true,
  pkce: {
    // Enforce PKCE for every authorization request, not only for public clients.
    required: () => true,
  },
  ttl: {
    DeviceCode: (ctx, code, client) => (
      client.clientId === 'tg-device-short' ? SHORT_DEVICE_CODE_TTL_S : 10 * 60),
  },
  // oidc-provider checks iss, aud, exp, jti and the signature of a client assertion but not sub;
  // RFC 7523 §3 also requires sub == client_id, and tokengate promises a short exp.
  assertJwtClientAuthClaimsAndHeader: async (ctx, claims, header, client) => {
    if (claims.sub !== client.clientId) {
      throw new errors.InvalidClientAuth('sub (JWT subject) must be the client_id');
    }
    if (claims.exp - Math.floor(Date.now() / 1000) > 300) {
      throw new errors.InvalidClientAuth('client assertion lives longer than 5 minutes');
    }
  },
  findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
});

// ---------------------------------------------------------------- custom grants (RingCentral's)

// Issues an access token and a refresh token for `accountId`, like the built-in grants do.
async function issueUserTokens(ctx, accountId) {
  const { client } = ctx.oidc;
  const { AccessToken, RefreshToken, Grant } = ctx.oidc.provider;
  const scope = 'openid offline_access';
  const grant = new Grant({ accountId, clientId: client.clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();
  const gty = ctx.oidc.params.grant_type;
  const at = new AccessToken({ accountId, client, grantId, gty, scope });
  const rt = new RefreshToken({ accountId, client, grantId, gty, scope });
  ctx.body = {
    access_token: await at.save(),
    token_type: 'Bearer',
    expires_in: at.expiration,
    refresh_token: await rt.save(),
    scope,
  };
}

// Each handler accepts exactly one credential, so a wrong or missing field from tokengate is
// `invalid_grant` (or `invalid_request` for a missing parameter) instead of a silent success.
// In oidc-provider 9 a handler is `async (ctx) => …`; the third argument lists the parameters
// the grant reads from the body.
provider.registerGrantType('password', async (ctx) => {
  const { username, password } = ctx.oidc.params;
  if (username !== USER.username || password !== USER.password) {
    throw new errors.InvalidGrant('invalid resource owner credentials');
  }
  await issueUserTokens(ctx, username);
}, ['username', 'password']);

// tokengate's OtpGrant sends the one-time code as `code`.
provider.registerGrantType('otp', async (ctx) => {
  if (ctx.oidc.params.code !== OTP_CODE) throw new errors.InvalidGrant('invalid otp code');
  await issueUserTokens(ctx, 'otp-user');
}, ['code']);

provider.registerGrantType(JWT_BEARER_GRANT, async (ctx) => {
  if (ctx.oidc.params.assertion !== JWT_BEARER_ASSERTION) {
    throw new errors.InvalidGrant('invalid assertion');
  }
  await issueUserTokens(ctx, 'jwt-user');
}, ['assertion']);

provider.registerGrantType('partner_jwt', async (ctx) => {
  if (ctx.oidc.params.assertion !== PARTNER_JWT_ASSERTION) {
    throw new errors.InvalidGrant('invalid partner assertion');
  }
  await issueUserTokens(ctx, 'partner-user');
}, ['assertion']);

// ---------------------------------------------------------------- test-only middleware

// Every form POST to the token or revocation endpoint, as received, newest last. The test reads it
// at GET /_interop/requests to check what tokengate put on the wire (the client assertion's
// claims, the absence of a Basic header). This is the only route the provider does not own.
const seen = [];
const lastPoll = new Map(); // device_code -> ms of its last poll

provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/_interop/requests') {
    ctx.body = seen;
    return;
  }

  const recorded = ctx.method === 'POST' && [TOKEN_PATH, REVOKE_PATH].includes(ctx.path)
    && ctx.is('application/x-www-form-urlencoded');
  if (recorded) {
    // Read the body here; oidc-provider then uses ctx.request.body instead of the spent stream.
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const form = querystring.parse(Buffer.concat(chunks).toString('utf8'));
    ctx.request.body = form;
    seen.push({
      path: ctx.path,
      form,
      authorization: ctx.get('authorization') || null,
      userAgent: ctx.get('user-agent') || null,
    });

    // RFC 8628 §3.5: polling one device code faster than `interval` is `slow_down`.
    if (ctx.path === TOKEN_PATH && form.grant_type === DEVICE_GRANT && form.device_code) {
      const now = Date.now();
      const last = lastPoll.get(form.device_code);
      lastPoll.set(form.device_code, now);
      if (last !== undefined && now - last < DEVICE_POLL_INTERVAL_S * 1000) {
        const err = new errors.SlowDown();
        ctx.status = err.statusCode;
        ctx.set('cache-control', 'no-store');
        ctx.body = { error: err.error, error_description: err.error_description };
        return;
      }
    }
  }

  await next();

  // RFC 8628 §3.2: tell the device how often it may poll.
  if (ctx.method === 'POST' && ctx.path === DEVICE_AUTH_PATH && ctx.status === 200 && ctx.body) {
    ctx.body = { ...ctx.body, interval: DEVICE_POLL_INTERVAL_S };
  }
});

provider.on('grant.error', (ctx, err) => {
  console.error('grant.error', err.error, err.error_description, err.error_detail ?? '');
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());
console.log(JSON.stringify({ listening: ISSUER }));

// Exit at once when the test stops us (tokengate's pooled keep-alive connections would hold a
// graceful server.close() open).
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
