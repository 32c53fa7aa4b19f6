"""Fakes of Slack and OpenAI that speak the real wire formats, in-process or over sockets.

In-process (deterministic, runs under a Trio MockClock):
    httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) and `FakeSlack.connector`.
Over real sockets on 127.0.0.1 (end-to-end tests of the bot process):
    `slack_server(fake_slack)`, `openai_server(fake_openai)`, `http_server(handler)`.
"""

from .openai import Behaviour, FakeOpenAI, echo, error_response, image_parts, last_user_text
from .servers import WsprotoLink, http_server, openai_server, slack_server
from .slack import Delivery, FakeSlack, Link, MemoryLink, MemoryWebSocket, NoConnection

__all__ = [
    "Behaviour",
    "Delivery",
    "FakeOpenAI",
    "FakeSlack",
    "Link",
    "MemoryLink",
    "MemoryWebSocket",
    "NoConnection",
    "WsprotoLink",
    "echo",
    "error_response",
    "http_server",
    "image_parts",
    "last_user_text",
    "openai_server",
    "slack_server",
]
