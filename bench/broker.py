"""The token broker's scenarios: upstream POSTs per 1,000 client calls, and RSS at 100,000
cached entries. Driven by harness.py after the timed runs.

Every scenario starts its own processes: the mock upstream (`tokengate-bench upstream`, with
`--rotate` where renewals are counted, so each POST issues a new token pair and a refresh token
works once), redis-server when the fleet shares state, and one or three tokengate release
binaries. The calls are made by `tokengate-bench calls`, which checks every answer (gRPC status,
a token) and counts them by `GetTokenResponse.source`; the POSTs are counted by the upstream,
by grant. Nothing here is pinned or timed: these are counts.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from procs import (BENCH, TOKENGATE, BenchError, Redis, Server, run, upstream_stats,
                   write_config)

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JOINED = "connected to redis"
REJOINED = "rejoined the fleet"


@dataclass
class BrokerSettings:
    burst_calls: int = 1000
    steady_s: float = 60
    steady_expires_in: int = 20
    steady_refresh_ahead: float = 5
    steady_min_remaining: float = 2
    steady_callers: int = 50
    steady_interval_ms: int = 10
    # memory: one replica; redis: three replicas sharing Redis.
    steady_backends: tuple[str, ...] = ("memory", "redis")
    race_rounds: int = 3
    race_calls: int = 999
    race_expires_in: int = 6
    race_refresh_ahead: float = 2
    race_min_remaining: float = 1
    fill_entries: int = 100_000
    fill_concurrency: int = 64

    @classmethod
    def smoke(cls) -> "BrokerSettings":
        return cls(burst_calls=200, steady_s=6, steady_expires_in=4, steady_refresh_ahead=1,
                   steady_min_remaining=0.5, steady_callers=10, steady_backends=("redis",),
                   race_rounds=1, race_calls=150, race_expires_in=4, race_refresh_ahead=1,
                   race_min_remaining=0.5, fill_entries=2_000)


def seconds(value: float) -> str:
    return f"{int(round(value * 1000))}ms"


class Fleet:
    """One mock upstream, `replicas` tokengate processes and, for `backend = "redis"`, one
    redis-server they share."""

    def __init__(self, work: Path, name: str, replicas: int, backend: str,
                 upstream_args: tuple[str, ...] = (), cache: dict | None = None):
        self.name = name
        self.upstream = Server(f"{name} upstream", [str(BENCH), "upstream", *upstream_args], None)
        self.redis: Redis | None = None
        self.replicas: list[Server] = []
        try:
            settings = {"backend": backend, **(cache or {})}
            if backend == "redis":
                self.redis = Redis()
                key = work / f"{name}.key"
                key.write_bytes(os.urandom(32))
                settings.update(key_file=str(key), redis_url=self.redis.url)
            config = write_config(work / f"{name}.toml", self.upstream, cache=settings)
            for i in range(replicas):
                self.replicas.append(Server(f"{name} tokengate {i}",
                                            [str(TOKENGATE), "serve", "--config", str(config)],
                                            None, watch=(JOINED, REJOINED)))
            if self.redis:
                # A replica that has not joined yet would go on alone and spoil the count.
                for replica in self.replicas:
                    replica.wait_for(JOINED)
                self.wait_subscribed()
        except BaseException:
            self.close()
            raise

    def wait_subscribed(self, timeout: float = 20) -> None:
        """Until every replica listens on the notice channel (renewals reach the others)."""
        assert self.redis is not None
        deadline = time.monotonic() + timeout
        while True:
            reply = self.redis.command(["PUBSUB", "NUMSUB", "tokengate:notices"])
            if reply.rstrip().split(b":")[-1] == str(len(self.replicas)).encode():
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: replicas did not subscribe: {reply!r}")
            time.sleep(0.02)

    @property
    def addrs(self) -> list[str]:
        return [f"http://{r.addr}" for r in self.replicas]

    def stats(self) -> dict:
        return upstream_stats(self.upstream)

    def calls(self, *, accounts: str | None = None, distinct: int = 1, calls: int | None = None,
              concurrency: int = 1, duration: float | None = None, callers: int = 1,
              interval_ms: int = 0, start_at: float | None = None, connections: int = 8,
              addrs: list[str] | None = None) -> dict:
        argv = [str(BENCH), "calls", "--connections", str(connections)]
        for addr in addrs or self.addrs:
            argv += ["--addr", addr]
        if accounts is not None:
            argv += ["--accounts", accounts, "--distinct", str(distinct)]
        if duration is not None:
            argv += ["--duration", seconds(duration), "--callers", str(callers),
                     "--interval", f"{interval_ms}ms"]
        else:
            argv += ["--calls", str(calls), "--concurrency", str(concurrency)]
        if start_at is not None:
            argv += ["--start-at-ms", str(int(start_at * 1000))]
        return json.loads(run(argv))

    def close(self) -> None:
        for server in [*self.replicas, self.upstream]:
            server.stop()
        if self.redis:
            self.redis.stop()


def delta(after: dict, before: dict) -> dict:
    """What the upstream saw between two /stats readings."""
    grants = {k: v - before["by_grant"].get(k, 0) for k, v in after["by_grant"].items()}
    return {"posts": after["posts"] - before["posts"],
            "by_grant": {k: v for k, v in grants.items() if v},
            "refresh_reused": after["refresh_reused"] - before["refresh_reused"],
            "refresh_unknown": after["refresh_unknown"] - before["refresh_unknown"]}


def per_1000(posts: int, calls: int) -> float:
    return posts * 1000 / calls if calls else float("nan")


def failures(out: dict) -> list[str]:
    """What makes a driver run unusable: failed calls or calls that did not answer."""
    problems = []
    if out["errors"]:
        problems.append(f"failed calls {out['errors']}")
    if out["ok"] != out["calls"]:
        problems.append(f"{out['calls'] - out['ok']} of {out['calls']} calls without a token")
    return problems


def row(key: str, label: str, calls: int, seen: dict, goal: str, problems: list[str],
        **extra) -> dict:
    """One scenario's line in the table; `problems` empty means the goal was met."""
    return {"key": key, "label": label, "calls": calls, **seen,
            "per_1000": per_1000(seen["posts"], calls), "goal": goal,
            "met": not problems, "problems": problems, **extra}


def grants_text(by_grant: dict) -> str:
    names = {JWT_GRANT: "jwt_bearer"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(by_grant.items())) or "none"


# ---------------------------------------------------------------------------------------------
# Scenarios


def burst(s: BrokerSettings, work: Path, replicas: int) -> dict:
    """`burst_calls` identical calls at the same instant on a cold cache: one POST."""
    backend = "memory" if replicas == 1 else "redis"
    fleet = Fleet(work, f"burst{replicas}", replicas, backend)
    try:
        before = fleet.stats()
        out = fleet.calls(calls=s.burst_calls, concurrency=s.burst_calls, connections=10)
        seen = delta(fleet.stats(), before)
    finally:
        fleet.close()
    problems = failures(out)
    if seen["posts"] != 1:
        problems.append(f"{seen['posts']} POSTs")
    if out["distinct_tokens"] != 1:
        problems.append(f"{out['distinct_tokens']} distinct tokens handed out")
    where = "one replica" if replicas == 1 else "three replicas sharing Redis"
    return row(f"burst_{replicas}", f"Burst: {out['calls']:,} identical jwt_bearer calls at "
               f"once on a cold cache, {where}", out["calls"], seen, "1 POST", problems,
               sources=out["sources"], p50_us=out["p50_us"], max_us=out["max_us"])


def renewal_bounds(elapsed: float, lifetime: float, ahead: float) -> tuple[int, int]:
    """How many renewals `elapsed` seconds of steady calls should see if each token is renewed
    exactly once: one per renewal period, which is the lifetime less `refresh_ahead` (moved up
    by up to a tenth, at random) plus up to half a second until a call notices."""
    return (math.floor(elapsed / (lifetime - ahead + 0.5)),
            math.floor(elapsed / (lifetime - ahead * 1.1)))


def steady(s: BrokerSettings, work: Path, backend: str) -> dict:
    """Callers that each call every `steady_interval_ms` for `steady_s`, with a short token
    lifetime: one grant, then one renewal per lifetime, ahead of expiry, so no caller waits."""
    replicas = 1 if backend == "memory" else 3
    cache = {"refresh_ahead": seconds(s.steady_refresh_ahead),
             "min_remaining": seconds(s.steady_min_remaining)}
    fleet = Fleet(work, f"steady-{backend}", replicas, backend,
                  ("--rotate", "--expires-in", str(s.steady_expires_in)), cache)
    try:
        before = fleet.stats()
        out = fleet.calls(duration=s.steady_s, callers=s.steady_callers,
                          interval_ms=s.steady_interval_ms, connections=4)
        seen = delta(fleet.stats(), before)
    finally:
        fleet.close()
    problems = failures(out)
    grants = seen["by_grant"].get(JWT_GRANT, 0)
    renewals = seen["by_grant"].get("refresh_token", 0)
    low, high = renewal_bounds(out["elapsed_s"], s.steady_expires_in, s.steady_refresh_ahead)
    if grants != 1:
        problems.append(f"{grants} jwt_bearer POSTs (one expected: every later token renewed)")
    if seen["refresh_reused"] or seen["refresh_unknown"]:
        problems.append(f"refresh tokens spent twice {seen['refresh_reused']}, unknown "
                        f"{seen['refresh_unknown']}")
    if not low <= renewals <= high:
        problems.append(f"{renewals} renewals, not {low}–{high}")
    waited = out["calls"] - out["sources"].get("cache", 0)
    if waited > s.steady_callers:
        problems.append(f"{waited} answers not from the cache (the first {s.steady_callers} "
                        f"at most)")
    where = "one replica" if replicas == 1 else "three replicas sharing Redis"
    rate = 1000 // s.steady_interval_ms if s.steady_interval_ms else "max"
    label = (f"Steady state, {where}: expires_in {s.steady_expires_in} s, refresh_ahead "
             f"{s.steady_refresh_ahead:g} s, {s.steady_callers} callers × {rate}/s, "
             f"{out['elapsed_s']:.0f} s")
    return row(f"steady_{backend}", label, out["calls"], seen,
               f"1 jwt_bearer + 1 renewal per lifetime ({low}–{high})", problems,
               renewals=renewals, expected=[low, high], not_from_cache=waited,
               distinct_tokens=out["distinct_tokens"], sources=out["sources"])


def race(s: BrokerSettings, work: Path) -> list[dict]:
    """The refresh race: a token is due for renewal and `race_calls` identical calls arrive at
    once over three replicas sharing Redis. `ahead`: inside the renewal window (answers come
    from the cache, one background renewal); `expiry`: past `min_remaining` (every caller
    waits for one renewal). Each renewal spends a single-use refresh token: the upstream
    refuses a second use, so a race lost by the broker shows as a reused token."""
    e, a, m = s.race_expires_in, s.race_refresh_ahead, s.race_min_remaining
    cache = {"refresh_ahead": seconds(a), "min_remaining": seconds(m)}
    fleet = Fleet(work, "race", 3, "redis", ("--rotate", "--expires-in", str(e)), cache)
    # Renewal starts at e − a·(1 + jitter/10) ≤ e − a; answers stop at e − m; the entry
    # lasts until e.
    offsets = {"ahead": e - a + 0.2 * (a - m), "expiry": e - m + 0.3 * m}
    results = []
    try:
        for variant, offset in offsets.items():
            calls, rounds, problems = 0, [], []
            total = {"posts": 0, "by_grant": {}, "refresh_reused": 0, "refresh_unknown": 0}
            for r in range(s.race_rounds):
                prefix = f"race-{variant}-{r}-"
                first = fleet.calls(accounts=prefix, calls=1, addrs=fleet.addrs[:1],
                                    connections=1)
                t0 = time.time()
                problems += failures(first)
                before = fleet.stats()
                out = fleet.calls(accounts=prefix, calls=s.race_calls,
                                  concurrency=s.race_calls, start_at=t0 + offset, connections=4)
                seen = delta(fleet.stats(), before)
                problems += failures(out)
                start = out["started_unix_ms"] / 1000 - t0
                window = (e - a, e - m) if variant == "ahead" else (e - m, e)
                if not window[0] <= start < window[1]:
                    problems.append(f"round {r + 1}: the burst started {start:.2f} s after the "
                                    f"token, outside {window[0]:g}–{window[1]:g} s")
                rounds.append({"posts": seen["posts"], "by_grant": seen["by_grant"],
                               "sources": out["sources"], "max_us": out["max_us"],
                               "distinct_tokens": out["distinct_tokens"]})
                if seen["by_grant"] != {"refresh_token": 1}:
                    problems.append(f"round {r + 1}: {grants_text(seen['by_grant'])}")
                if seen["refresh_reused"]:
                    problems.append(f"round {r + 1}: a refresh token was presented "
                                    f"{seen['refresh_reused'] + 1} times")
                if variant == "expiry" and out["distinct_tokens"] != 1:
                    problems.append(f"round {r + 1}: {out['distinct_tokens']} tokens handed out")
                calls += out["calls"]
                total["posts"] += seen["posts"]
                total["refresh_reused"] += seen["refresh_reused"]
                total["refresh_unknown"] += seen["refresh_unknown"]
                for k, v in seen["by_grant"].items():
                    total["by_grant"][k] = total["by_grant"].get(k, 0) + v
            when = ("inside the renewal window (answered from the cache while one renewal runs)"
                    if variant == "ahead" else
                    "past min_remaining (every caller waits for the renewal)")
            label = (f"Refresh race, {when}: {s.race_calls:,} identical calls at once over three "
                     f"replicas sharing Redis, {s.race_rounds} round(s); expires_in {e} s")
            results.append(row(f"race_{variant}", label, calls, total,
                               "1 refresh_token per round, no refresh token spent twice",
                               problems, rounds=rounds))
    finally:
        fleet.close()
    return results


def outage(s: BrokerSettings, work: Path) -> list[dict]:
    """Three replicas sharing Redis; Redis is killed (SIGKILL), then started again on the same
    port. While it is down each replica goes on alone: a warm key is still a hit everywhere,
    a cold key costs at most one POST per replica (no fleet-wide lease), and no call waits
    out a timeout. Once the replicas rejoin, a burst is one POST again."""
    fleet = Fleet(work, "outage", 3, "redis")
    n = s.burst_calls
    out_rows = []
    try:
        assert fleet.redis is not None
        before = fleet.stats()
        warm = fleet.calls(accounts="outage-warm-", calls=n, concurrency=n)
        seen = delta(fleet.stats(), before)
        problems = failures(warm) + ([f"{seen['posts']} POSTs"] if seen["posts"] != 1 else [])
        out_rows.append(row("outage_before", f"Redis up: {n:,} identical calls at once over "
                            "three replicas (the key warmed for the outage)", warm["calls"],
                            seen, "1 POST", problems, max_us=warm["max_us"]))

        fleet.redis.kill()
        down_at = time.time()
        before = fleet.stats()
        hit = fleet.calls(accounts="outage-warm-", calls=n, concurrency=n)
        seen = delta(fleet.stats(), before)
        problems = failures(hit) + ([f"{seen['posts']} POSTs"] if seen["posts"] else [])
        out_rows.append(row("outage_warm", "Redis killed: the same warm key, at once over three "
                            f"replicas (slowest call {hit['max_us'] / 1000:.1f} ms)",
                            hit["calls"], seen, "0 POSTs", problems,
                            max_us=hit["max_us"], sources=hit["sources"]))

        before = fleet.stats()
        cold = fleet.calls(accounts="outage-cold-", calls=n, concurrency=n)
        seen = delta(fleet.stats(), before)
        problems = failures(cold)
        if not 1 <= seen["posts"] <= len(fleet.replicas):
            problems.append(f"{seen['posts']} POSTs")
        out_rows.append(row("outage_cold", "Redis killed: a cold key, at once over three "
                            f"replicas, each alone (slowest call {cold['max_us'] / 1000:.1f} ms)",
                            cold["calls"], seen,
                            "≤ 3 POSTs (1 per replica)", problems, max_us=cold["max_us"],
                            down_for_s=time.time() - down_at))

        fleet.redis.start()
        started = time.monotonic()
        for replica in fleet.replicas:
            replica.wait_for(REJOINED, timeout=60)
        rejoin_s = time.monotonic() - started
        fleet.wait_subscribed(timeout=60)
        before = fleet.stats()
        back = fleet.calls(accounts="outage-after-", calls=n, concurrency=n)
        seen = delta(fleet.stats(), before)
        problems = failures(back) + ([f"{seen['posts']} POSTs"] if seen["posts"] != 1 else [])
        out_rows.append(row("outage_after", f"Redis back (every replica rejoined within "
                            f"{rejoin_s:.1f} s): a new key, at once over three replicas",
                            back["calls"], seen, "1 POST", problems, max_us=back["max_us"],
                            rejoin_s=rejoin_s))
    finally:
        fleet.close()
    return out_rows


def fill(s: BrokerSettings, work: Path) -> dict:
    """RSS with `fill_entries` distinct cached tokens (client_credentials for distinct
    accounts, each with its own ~1 KB token pair), memory backend, one replica; a second pass
    proves they are all still held (every call a hit)."""
    fleet = Fleet(work, "fill", 1, "memory", ("--rotate",))
    try:
        server = fleet.replicas[0]
        idle = server.status("VmRSS")
        n = s.fill_entries
        before = fleet.stats()
        first = fleet.calls(accounts="acct-", distinct=n, calls=n,
                            concurrency=s.fill_concurrency, connections=4)
        filled = delta(fleet.stats(), before)
        rss = server.status("VmRSS")
        anon = server.status("RssAnon")
        before = fleet.stats()
        again = fleet.calls(accounts="acct-", distinct=n, calls=n,
                            concurrency=s.fill_concurrency, connections=4)
        reread = delta(fleet.stats(), before)
        rss_after = server.status("VmRSS")
        hwm = server.status("VmHWM")
    finally:
        fleet.close()
    problems = failures(first) + failures(again)
    if filled["posts"] != n or first["sources"].get("upstream", 0) != n:
        problems.append(f"fill: {filled['posts']} POSTs, sources {first['sources']}")
    hits = again["sources"].get("cache", 0)
    if hits != n or reread["posts"]:
        problems.append(f"second pass: {hits} hits, {reread['posts']} POSTs")
    return {"entries": n, "idle_kib": idle, "rss_kib": rss, "anon_kib": anon,
            "rss_after_reread_kib": rss_after, "hwm_kib": hwm, "hits_on_reread": hits,
            "bytes_per_entry": (rss - idle) * 1024 / n, "fill_s": first["elapsed_s"],
            "problems": problems, "met": not problems}


def measure(s: BrokerSettings, work: Path) -> dict:
    scenarios = [burst(s, work, 1), burst(s, work, 3)]
    print(f"bursts: {json.dumps(scenarios)}", flush=True)
    for backend in s.steady_backends:
        scenarios.append(steady(s, work, backend))
        print(f"steady {backend}: {json.dumps(scenarios[-1])}", flush=True)
    scenarios += race(s, work)
    print(f"refresh race: {json.dumps(scenarios[-2:])}", flush=True)
    scenarios += outage(s, work)
    print(f"redis outage: {json.dumps(scenarios[-4:])}", flush=True)
    filled = fill(s, work)
    print(f"fill: {json.dumps(filled)}", flush=True)
    return {"scenarios": scenarios, "fill": filled, "settings": s.__dict__}


# ---------------------------------------------------------------------------------------------
# Report


def table(broker: dict) -> str:
    lines = ["| scenario | client calls | upstream POSTs (by grant) | POSTs per 1,000 calls | "
             "goal | |", "|---|---|---|---|---|---|"]
    for sc in broker["scenarios"]:
        verdict = "met" if sc["met"] else "**missed**: " + "; ".join(sc["problems"])
        lines.append(f"| {sc['label']} | {sc['calls']:,} | {sc['posts']:,} "
                     f"({grants_text(sc['by_grant'])}) | {sc['per_1000']:.3g} | {sc['goal']} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"
