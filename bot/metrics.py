"""The bot's Prometheus metrics: one `Metrics` object, created at start and passed in.

It owns a private `CollectorRegistry` (no global registry, so two bots in one process —
tests, the simulation — never collide) and exposes the instruments as attributes. Code
that observes something calls them directly, e.g.
`metrics.requests.labels(outcome="answered").inc()`. Gauges whose value lives elsewhere
(requests in flight, the model-slot limiter) are read when scraped, via `watch_*`.

`render()` is the `/metrics` body (Prometheus text format, `generate_latest`).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. Acks are fast (ms); replies are model latency plus a little (s).
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0)
REPLY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Socket Mode
        self.events_received = Counter(
            "slackbot_events_received", "Envelopes received, by envelope or event type", ["type"], registry=r
        )
        self.envelopes_acked = Counter("slackbot_envelopes_acked", "Envelopes acked", registry=r)
        self.ack_latency = Histogram(
            "slackbot_ack_latency_seconds",
            "From reading an envelope's frame to its ack written",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.socket_reconnects = Counter(
            "slackbot_socket_reconnects", "Socket Mode connections replaced, by reason", ["reason"], registry=r
        )
        # Requests
        self.requests = Counter(
            "slackbot_requests",
            "Requests by outcome (answered, busy, queued, timeout, interrupted, "
            "error, duplicate); queued counts requests that had to wait for a model slot",
            ["outcome"],
            registry=r,
        )
        self.request_errors = Counter(
            "slackbot_request_errors", "Requests that ended in an error, by kind", ["kind"], registry=r
        )
        self.reply_latency = Histogram(
            "slackbot_reply_latency_seconds",
            "From the request's start to its final text, by outcome",
            ["outcome"],
            buckets=REPLY_BUCKETS,
            registry=r,
        )
        self.first_token_latency = Histogram(
            "slackbot_time_to_first_token_seconds",
            "From the request's start to the model's first text",
            buckets=REPLY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("slackbot_requests_in_flight", "Requests being answered", registry=r)
        self.queued = Gauge("slackbot_requests_queued", "Requests waiting for a model slot", registry=r)
        self.slots_borrowed = Gauge(
            "slackbot_model_slots_borrowed", "Model slots in use (ASYNC_MAX_CONCURRENT_REQUESTS limiter)", registry=r
        )
        self.slots_total = Gauge("slackbot_model_slots_total", "Model slots in all", registry=r)
        # Web APIs and storage
        self.slack_calls = Counter(
            "slackbot_slack_api_calls", "Slack Web API calls, by method and result", ["method", "result"], registry=r
        )
        self.slack_rate_limited = Counter(
            "slackbot_slack_api_rate_limited",
            "Slack Web API 429 (or ratelimited) answers, by method",
            ["method"],
            registry=r,
        )
        self.openai_tokens = Counter(
            "slackbot_openai_tokens",
            "OpenAI tokens, by model and direction (in = prompt, out = completion)",
            ["model", "direction"],
            registry=r,
        )
        self.storage_latency = Histogram(
            "slackbot_storage_call_seconds", "Storage calls, by method", ["method"], buckets=STORAGE_BUCKETS, registry=r
        )

    def watch_requests(self, in_flight: Callable[[], int]) -> None:
        """Read the number of requests in flight from `in_flight()` at each scrape."""
        self.in_flight.set_function(in_flight)

    def watch_limiter(self, limiter: anyio.CapacityLimiter) -> None:
        """Read the model-slot limiter (borrowed, total, waiting) at each scrape."""
        self.slots_borrowed.set_function(lambda: limiter.borrowed_tokens)
        self.slots_total.set_function(lambda: limiter.total_tokens)
        self.queued.set_function(lambda: limiter.statistics().tasks_waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def first_call_timer(on_delta: Callable[[str], None], on_first: Callable[[], None]) -> Callable[[str], None]:
    """Wrap `on_delta` so that `on_first()` runs once, before the first piece is passed on."""
    fired = False

    def wrapped(piece: str) -> None:
        nonlocal fired
        if not fired:
            fired = True
            on_first()
        on_delta(piece)

    return wrapped
