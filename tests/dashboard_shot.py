"""The README's dashboard screenshot, taken of a real proxy under live load. Run by hand:

    python -m tests.dashboard_shot                   # about 4 minutes → docs/dashboard.png
    python -m tests.dashboard_shot --seconds 60 --out /tmp/shot.png --dark

It starts the fake OpenRouter (TLS from a throwaway trustme CA) and the proxy in-process,
with six test keys over three accounts, and drives varied traffic through the proxy:
several models, paid and free, streams and plain completions carrying OpenRouter's
``usage`` (cached and reasoning tokens, cost from the model's prices), a load that rises
and falls. The fake behaves as OpenRouter does: free models are limited per account and
minute (a 429 with OpenRouter's body and ``X-RateLimit-Reset``, which rests every key of
that account until the next minute), one key runs out of its free daily quota (rested
until UTC midnight), one key is refused with a 401 (disabled), a provider is overloaded
now and then (a 429 that rests nobody), and two models' providers fail sometimes (502,
503).
Then headless Chromium logs in to /metrics and saves a full-page shot 1400 px wide, with
the load still running. The keys are made up; nothing here reaches the network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import ssl
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from orproxy.app import App
from orproxy.config import build_config
from tests.browser import Browser
from tests.fakeor import OVERLOAD_BODY, FakeOpenRouter, Recorded, Responder, reset_ms
from tests.rawhttp import roundtrip

ACCESS_KEY = "screenshot-access-key"
OUT = Path(__file__).parent.parent / "docs" / "dashboard.png"
KEYS: list[tuple[str, str | None]] = [  # made up: the fake accepts anything
    ("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", "team-a"),
    ("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", "team-a"),
    ("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", "research"),
    ("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", "research"),
    ("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", "ops"),
    ("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", None),
]
INVALID = 4  # the key OpenRouter no longer knows: a 401, then disabled
DAILY = 5  # the key that runs out of free requests for the day
DAILY_QUOTA = 15
FREE_PER_MINUTE = {"team-a": 20, "research": 6, "ops": 20, None: 20}


@dataclass(frozen=True)
class Model:
    name: str
    weight: float  # share of the traffic
    price_in: float  # USD per token
    price_out: float
    seconds: float  # typical time to answer
    reasoning: bool = False
    provider: str = "OpenAI"

    @property
    def free(self) -> bool:
        return self.name.endswith(":free")


MODELS = [
    Model("openai/gpt-4o-mini", 30, 0.15e-6, 0.6e-6, 0.5),
    Model("anthropic/claude-3.5-sonnet", 14, 3e-6, 15e-6, 1.4, provider="Anthropic"),
    Model("google/gemini-2.0-flash-001", 12, 0.1e-6, 0.4e-6, 0.4, provider="Google"),
    Model("deepseek/deepseek-r1", 8, 0.55e-6, 2.19e-6, 3.0, reasoning=True,
          provider="DeepInfra"),
    Model("meta-llama/llama-3.3-70b-instruct:free", 14, 0, 0, 0.9, provider="Together"),
    Model("google/gemma-3-27b-it:free", 10, 0, 0, 0.8, provider="Google AI Studio"),
    Model("qwen/qwen-2.5-coder-32b-instruct", 6, 0.07e-6, 0.16e-6, 0.7, provider="Fireworks"),
]
BY_NAME = {m.name: m for m in MODELS}


def limit_body(message: str, limit: int, reset: str) -> dict[str, Any]:
    return {"error": {"code": 429, "message": message, "metadata": {
        "headers": {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": reset}, "provider_name": None}}}


@dataclass
class Upstream:
    """OpenRouter as the proxy meets it: per-account free limits, a dead key, a busy
    provider, answers that take time."""

    rng: random.Random
    free_this_minute: Counter[tuple[str | None, int]] = field(default_factory=Counter)
    daily_used: int = 0
    served: Counter[int] = field(default_factory=Counter)

    async def script(self, req: Recorded, resp: Responder) -> None:
        auth = (req.header(b"authorization") or b"").removeprefix(b"Bearer ").decode()
        index = next(i for i, (secret, _) in enumerate(KEYS) if secret == auth)
        account = KEYS[index][1]
        if req.method != b"POST":  # the proxy's own look-ups (/key, /models): not served here
            await resp.json(404, {"error": {"code": 404, "message": "Not Found"}})
            return
        body = req.json()
        model = BY_NAME[body["model"]]
        self.served[index] += 1
        refusal = self.refusal(index, account, model)
        if refusal is not None:
            await asyncio.sleep(self.rng.uniform(0.05, 0.2))
            await resp.json(refusal[0], refusal[1])
            return
        usage = self.usage(model)
        if body.get("stream"):
            await self.stream(resp, model, usage)
        else:
            await asyncio.sleep(self.rng.lognormvariate(math.log(model.seconds), 0.5))
            await resp.json(200, completion(model, usage))

    def refusal(self, index: int, account: str | None,
                model: Model) -> tuple[int, dict[str, Any]] | None:
        if index == INVALID:
            return 401, {"error": {"code": 401, "message": "User not found."}}
        if model.free:
            if index == DAILY:
                self.daily_used += 1
                if self.daily_used > DAILY_QUOTA:
                    midnight = (math.floor(time.time() / 86400) + 1) * 86400
                    return 429, limit_body(
                        "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock "
                        "1000 free model requests per day", 50, str(midnight * 1000))
            minute = int(time.time() // 60)
            self.free_this_minute[(account, minute)] += 1
            if self.free_this_minute[(account, minute)] > FREE_PER_MINUTE[account]:
                return 429, limit_body("Rate limit exceeded: free-models-per-min.", 20,
                                       str(reset_ms(60 - time.time() % 60)))
            if model.name.startswith("google/gemma") and self.rng.random() < 0.08:
                return 429, OVERLOAD_BODY
        if model.reasoning and self.rng.random() < 0.12:
            return 502, {"error": {"code": 502, "message": "Provider returned error",
                                   "metadata": {"provider_name": model.provider,
                                                "raw": "upstream connect error"}}}
        if model.name.startswith("qwen/") and self.rng.random() < 0.15:
            return 503, {"error": {"code": 503, "message": "No endpoints found that can "
                                   "handle the requested parameters."}}
        return None

    def usage(self, model: Model) -> dict[str, Any]:
        rng = self.rng
        prompt = int(rng.lognormvariate(math.log(1800), 0.9)) + 20
        completion_tokens = int(rng.lognormvariate(math.log(350), 0.7)) + 5
        cached = int(prompt * rng.uniform(0.3, 0.9)) if rng.random() < 0.35 else 0
        reasoning = int(completion_tokens * rng.uniform(0.4, 0.8)) if model.reasoning else 0
        cost = (prompt - cached) * model.price_in + cached * model.price_in * 0.25 \
            + completion_tokens * model.price_out
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens, "cost": round(cost, 9),
                "is_byok": False,
                "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    async def stream(self, resp: Responder, model: Model, usage: dict[str, Any]) -> None:
        await resp.head(200, [(b"Content-Type", b"text/event-stream"),
                              (b"Cache-Control", b"no-cache")])
        await resp.data(b": OPENROUTER PROCESSING\n\n")
        await asyncio.sleep(self.rng.uniform(0.2, 0.6) * model.seconds)
        base = {"id": f"gen-{int(time.time())}-{self.rng.randrange(1 << 32):08x}",
                "provider": model.provider, "model": model.name,
                "object": "chat.completion.chunk", "created": int(time.time())}
        for _ in range(self.rng.randint(4, 10)):
            delta = {"role": "assistant", "content": "lorem ipsum "}
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.data(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(self.rng.uniform(0.03, 0.15))
        last = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": "stop"}], "usage": usage}
        await resp.data(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.end()


def completion(model: Model, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"gen-{int(time.time())}", "provider": model.provider, "model": model.name,
            "object": "chat.completion", "created": int(time.time()),
            "choices": [{"index": 0, "finish_reason": "stop", "native_finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Sure, here it is."}}],
            "usage": usage}


# --- the clients -----------------------------------------------------------------------------


def requests_per_second(elapsed: float) -> float:
    """A load that rises and falls, with a burst now and then: something for the charts."""
    wave = 2.5 + 1.5 * math.sin(elapsed / 45.0 + 2.5) + 0.8 * math.sin(elapsed / 11.0)
    burst = 3.0 if int(elapsed) % 90 in range(60, 70) else 0.0
    return max(0.4, wave + burst)


async def client(port: int, rng: random.Random, started: float, workers: int,
                 statuses: Counter[int], stop: asyncio.Event) -> None:
    weights = [m.weight for m in MODELS]
    while not stop.is_set():
        model = rng.choices(MODELS, weights)[0]
        body = json.dumps({"model": model.name, "stream": rng.random() < 0.5,
                           "messages": [{"role": "user", "content": "Summarise this."}]})
        request = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                   b"Authorization: Bearer " + ACCESS_KEY.encode() + b"\r\n"
                   b"Content-Type: application/json\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
        try:
            statuses[(await roundtrip(port, request, b"POST")).status] += 1
        except (OSError, TimeoutError, AssertionError):
            statuses[0] += 1
        pause = rng.expovariate(requests_per_second(time.monotonic() - started) / workers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)


# --- the run ---------------------------------------------------------------------------------


def proxy_config(fake_port: int, ca_file: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "access_key": ACCESS_KEY,
                   "log_level": "ERROR", "http_log_level": "ERROR"},
        "openrouter": {"keys": [{"key": k, "account": a} if a else k for k, a in KEYS],
                       "base_url": f"https://127.0.0.1:{fake_port}/api/v1",
                       "ca_file": ca_file, "rate_limit_cooldown": 60},
        "metrics": {"enable_system_metrics": True},
        "state": {"file": None},  # every run starts fresh and leaves no file behind
    }


async def shoot(app: App, out: Path, dark: bool) -> None:
    async with Browser() as browser:
        page = await browser.new_page(credentials=("admin", ACCESS_KEY))
        await page.set_viewport(1400, 900, dark=dark)
        await page.goto(f"http://127.0.0.1:{app.port}/metrics?refresh=1")
        await page.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 2")
        await page.screenshot(out)
        if page.errors:
            raise SystemExit(f"the page reported errors: {page.errors}")


async def run(seconds: float, out: Path, dark: bool, workers: int, seed: int) -> None:
    rng = random.Random(seed)
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    upstream = Upstream(random.Random(seed + 1))
    fake = FakeOpenRouter(tls=tls, script=upstream.script)
    await fake.start()
    with tempfile.TemporaryDirectory(prefix="orproxy-shot-") as tmp:
        ca_file = str(Path(tmp, "ca.pem"))
        ca.cert_pem.write_to_path(ca_file)
        app = App(build_config(proxy_config(fake.port, ca_file), {}))
        await app.start()
        stop = asyncio.Event()
        statuses: Counter[int] = Counter()
        started = time.monotonic()
        tasks = [asyncio.create_task(client(app.port, random.Random(rng.random()), started,
                                            workers, statuses, stop)) for _ in range(workers)]
        try:
            while (left := seconds - (time.monotonic() - started)) > 0:
                await asyncio.sleep(min(15.0, left))
                print(f"{time.monotonic() - started:5.0f} s  client statuses "
                      f"{dict(sorted(statuses.items()))}", flush=True)
            await shoot(app, out, dark)  # with the load still running
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await app.shutdown()
            await fake.stop()
            await asyncio.sleep(0.2)  # the fake's handlers see their aborted connections end
    print(f"saved {out}; upstream requests by key {dict(sorted(upstream.served.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="load before the shot")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dark", action="store_true", help="the dark colour scheme")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.out, args.dark, args.workers, args.seed))


if __name__ == "__main__":
    main()
