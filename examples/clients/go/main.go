// Command tokengate-client gets OAuth tokens from tokengate over gRPC, the way a Go backend
// would.
//
// It asks for a token with the default client, then with a named client and a JWT bearer
// grant; honours RetryInfo once; handles a resource server's 401 by asking again with
// rejected_access_token; and shows what two failures carry (ErrorInfo, RetryInfo,
// BadRequest), decoded with grpc's status package and errdetails. Each outcome is printed as
// one "event key=value" line; tokens are shown only as a SHA-256 prefix.
//
//	RC_JWT=<jwt> tokengate-client -addr 127.0.0.1:50051 -client-id my-app
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	// Generated from proto/tokengate/v1/token.proto by protoc (see README.md).
	tokengatev1 "example.com/tokengate-client/gen/tokengatev1"
)

const (
	callTimeout = 10 * time.Second
	// A longer wait than this is not worth holding a request for; give up instead.
	maxRetryWait = 60 * time.Second
	// An unsigned JWT: the upstream refuses it, which shows an OAuth error's details.
	unsignedJWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZW1vIn0."
)

var bare = regexp.MustCompile(`^[^\s"=\\]+$`)

// emit prints one line: the event, then key=value pairs (quoted when needed).
func emit(event string, kv ...interface{}) {
	var b strings.Builder
	b.WriteString(event)
	for i := 0; i+1 < len(kv); i += 2 {
		text := fmt.Sprint(kv[i+1])
		if !bare.MatchString(text) {
			text = strconv.Quote(text)
		}
		fmt.Fprintf(&b, " %s=%s", kv[i], text)
	}
	fmt.Println(b.String())
}

// fingerprint is enough to tell tokens apart in a log without printing one.
func fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])[:12]
}

// codeName gives the canonical name (UNAVAILABLE, INVALID_ARGUMENT), as other languages print it.
func codeName(c codes.Code) string {
	var b strings.Builder
	prev := rune(0)
	for _, r := range c.String() {
		if unicode.IsUpper(r) && unicode.IsLower(prev) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
		prev = r
	}
	return b.String()
}

// describeFailure prints the status and its google.rpc details; it returns RetryInfo's delay
// and whether there was one.
func describeFailure(step string, err error) (time.Duration, bool) {
	st := status.Convert(err)
	emit("failure", "step", step, "code", codeName(st.Code()), "message", st.Message())
	var delay time.Duration
	hasDelay := false
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			// Reason is stable; act on it. The metadata says why, for logs and support.
			emit("error_info", "step", step, "domain", d.GetDomain(), "reason", d.GetReason())
			keys := make([]string, 0, len(d.GetMetadata()))
			for k := range d.GetMetadata() {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				emit("metadata", "step", step, "key", k, "value", d.GetMetadata()[k])
			}
		case *errdetails.RetryInfo:
			delay, hasDelay = d.GetRetryDelay().AsDuration(), true
			emit("retry_info", "step", step, "delay_ms", delay.Milliseconds())
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				emit("field_violation", "step", step, "field", v.GetField(), "description", v.GetDescription())
			}
		}
	}
	return delay, hasDelay
}

// getToken calls GetToken; when the failure carries RetryInfo, it waits that long and tries
// once more.
func getToken(client tokengatev1.TokenServiceClient, step string, req *tokengatev1.GetTokenRequest) (*tokengatev1.GetTokenResponse, error) {
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		resp, err := client.GetToken(ctx, req)
		cancel()
		if err == nil {
			emit("token", "step", step, "source", resp.GetSource().String(),
				"sha256", fingerprint(resp.GetAccessToken()),
				"expires_in_s", resp.GetExpiresIn().GetSeconds())
			return resp, nil
		}
		delay, ok := describeFailure(step, err)
		if attempt == 2 || !ok || delay > maxRetryWait {
			return nil, err
		}
		emit("retry", "step", step, "delay_ms", delay.Milliseconds())
		time.Sleep(delay)
	}
}

// callAPI GETs the resource server with the token and returns the HTTP status.
func callAPI(step, url, accessToken string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+accessToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	emit("api", "step", step, "status", resp.StatusCode, "sha256", fingerprint(accessToken))
	return resp.StatusCode, nil
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func run() error {
	addr := flag.String("addr", envOr("TOKENGATE_ADDR", "127.0.0.1:50051"), "tokengate's gRPC address")
	clientID := flag.String("client-id", os.Getenv("TOKENGATE_CLIENT_ID"), "the named client for the JWT grant")
	apiURL := flag.String("api-url", envOr("API_URL", "https://platform.ringcentral.com/restapi/v1.0/account/~/extension/~"), "a resource the token is used on")
	flag.Parse()
	jwt := os.Getenv("RC_JWT") // a credential: from the environment, never a flag
	if *clientID == "" || jwt == "" {
		return fmt.Errorf("-client-id (or TOKENGATE_CLIENT_ID) and RC_JWT are required")
	}

	// grpc-go 1.33 (Debian) predates credentials/insecure; with a current grpc-go use
	// grpc.WithTransportCredentials(insecure.NewCredentials()), or TLS credentials.
	conn, err := grpc.Dial(*addr, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	client := tokengatev1.NewTokenServiceClient(conn)

	// 1. The default client: name no client_id, set the grant's oneof arm.
	defaultReq := &tokengatev1.GetTokenRequest{
		Grant: &tokengatev1.GetTokenRequest_ClientCredentials{ClientCredentials: &tokengatev1.ClientCredentialsGrant{}},
	}
	if _, err := getToken(client, "default", defaultReq); err != nil {
		return err
	}

	// 2. A named client with a JWT bearer grant (RingCentral's JWT flow).
	jwtReq := &tokengatev1.GetTokenRequest{
		ClientId: *clientID,
		Grant:    &tokengatev1.GetTokenRequest_JwtBearer{JwtBearer: &tokengatev1.JwtBearerGrant{Assertion: jwt}},
	}
	token, err := getToken(client, "named", jwtReq)
	if err != nil {
		return err
	}

	// 3. The API refused the token before it expired: ask again, naming the refused token,
	//    so tokengate drops it for every caller and fetches one fresh token.
	code, err := callAPI("named", *apiURL, token.GetAccessToken())
	if err != nil {
		return err
	}
	if code == http.StatusUnauthorized {
		again := proto.Clone(jwtReq).(*tokengatev1.GetTokenRequest)
		again.RejectedAccessToken = token.GetAccessToken()
		if token, err = getToken(client, "renewed", again); err != nil {
			return err
		}
		if _, err := callAPI("renewed", *apiURL, token.GetAccessToken()); err != nil {
			return err
		}
	}

	// 4. What failures carry: an OAuth error from the upstream, and a request refused
	//    locally with the offending field named.
	_, _ = getToken(client, "bad_jwt", &tokengatev1.GetTokenRequest{
		ClientId: *clientID,
		Grant:    &tokengatev1.GetTokenRequest_JwtBearer{JwtBearer: &tokengatev1.JwtBearerGrant{Assertion: unsignedJWT}},
	})
	_, _ = getToken(client, "bad_scope", &tokengatev1.GetTokenRequest{
		Grant:  &tokengatev1.GetTokenRequest_ClientCredentials{ClientCredentials: &tokengatev1.ClientCredentialsGrant{}},
		Scopes: []string{"ReadAccounts SMS"}, // one scope per entry; this one is refused
	})
	emit("done")
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "tokengate-client:", err)
		os.Exit(1)
	}
}
