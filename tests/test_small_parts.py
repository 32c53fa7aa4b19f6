"""In-memory dedupe, settings and log redaction."""

import asyncio
import importlib.util
import logging

import pytest
import sniffio

from bot.cli import _run_on
from bot.config import ConfigError, load_settings
from bot.dedupe import RecentKeys
from bot.logs import RedactSecrets
from tests.harness import test_settings

pytestmark = pytest.mark.anyio

BASE_ENV = {"SLACK_BOT_TOKEN": "xoxb-1-abc", "SLACK_APP_TOKEN": "xapp-1-abc", "OPENAI_API_KEY": "sk-abcdef123"}


def test_recent_keys_dedupe_and_bounds():
    keys = RecentKeys(max_keys=3, max_age=10)
    assert keys.add_all(("a", "b"), now=0)
    assert not keys.add_all(("c", "b"), now=1)  # shares "b"
    assert keys.add_all(("d",), now=2)
    assert len(keys) == 3  # bounded
    assert keys.prune(now=11.5) == 2 and len(keys) == 1


def test_settings_defaults_and_repr_hides_tokens():
    s = load_settings(BASE_ENV, dotenv_path=None)
    assert s.openai.async_timeout_seconds == 305 and s.openai.async_max_concurrent_requests == 100
    assert s.storage.database_url == "sqlite:///data/bot.db" and s.async_backend == "trio"
    assert "xoxb" not in repr(s) and "sk-" not in repr(s)


def test_the_harness_puts_flat_overrides_in_their_group_and_refuses_unknown_names():
    s = test_settings(openai_model="gpt-4o", max_file_mb=3.0, replica_id="r2", native_streaming=True)
    assert (s.openai.model, s.media.max_file_mb, s.replica.id, s.surfaces.native_streaming) == (
        "gpt-4o",
        3.0,
        "r2",
        True,
    )
    assert s.surfaces.welcome is False and s.openai.async_timeout_seconds == 5.0  # the rest as the harness sets it
    with pytest.raises(TypeError, match="opneai_model"):
        test_settings(opneai_model="gpt-4o")


@pytest.mark.parametrize(
    "change, name",
    [
        ({"SLACK_BOT_TOKEN": ""}, "SLACK_BOT_TOKEN"),
        ({"SLACK_APP_TOKEN": "xoxb-wrong"}, "SLACK_APP_TOKEN"),
        ({"ASYNC_TIMEOUT_SECONDS": "soon"}, "ASYNC_TIMEOUT_SECONDS"),
        ({"ASYNC_MAX_CONCURRENT_REQUESTS": "0"}, "ASYNC_MAX_CONCURRENT_REQUESTS"),
        ({"DATABASE_URL": "postgres://x"}, "DATABASE_URL"),
        ({"SLACK_API_URL": "ftp://x"}, "SLACK_API_URL"),
        ({"BOT_ASYNC_BACKEND": "curio"}, "BOT_ASYNC_BACKEND"),
    ],
)
def test_bad_settings_name_the_variable(change, name):
    with pytest.raises(ConfigError, match=name):
        load_settings({**BASE_ENV, **change}, dotenv_path=None)


@pytest.mark.parametrize("backend", ["trio", "asyncio", "uvloop"])
def test_each_backend_is_accepted_and_runs_its_own_event_loop(backend):
    """BOT_ASYNC_BACKEND names the loop the CLI starts: uvloop is asyncio on libuv."""
    settings = load_settings({**BASE_ENV, "BOT_ASYNC_BACKEND": backend.upper()}, dotenv_path=None)
    assert settings.async_backend == backend

    async def which_loop() -> str:
        if sniffio.current_async_library() == "trio":
            return "trio"
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert _run_on(settings.async_backend, which_loop) == backend


def test_uvloop_without_the_package_is_a_configuration_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="uvloop package"):
        load_settings({**BASE_ENV, "BOT_ASYNC_BACKEND": "uvloop"}, dotenv_path=None)


def test_redaction_hides_configured_and_token_shaped_secrets():
    f = RedactSecrets(("my-very-secret",))
    record = logging.LogRecord(
        "x", logging.INFO, "", 0, "key %s and %s and xoxb-999-zzz", ("my-very-secret", "sk-live-ABCDEFGH123"), None
    )
    f.filter(record)
    text = record.getMessage()
    assert "my-very-secret" not in text and "sk-live" not in text and "xoxb-999" not in text
    assert text.count("[redacted]") == 3


async def test_the_openai_client_verifies_with_the_tls_context_it_is_given():
    """The bot builds one TLS context (each loads the CA bundle) and hands it to every
    HTTP client, the OpenAI one included."""
    import ssl

    from bot.openai_client import openai_client

    tls = ssl.create_default_context()
    async with openai_client(test_settings().openai, tls=tls) as client:
        assert client._client._transport._pool._ssl_context is tls
    async with openai_client(test_settings().openai) as client:
        assert client._client._transport._pool._ssl_context is not tls
