"""The setup commands as a user runs them: `slackbot manifest`, `slackbot check` and
`slackbot shell`, as real processes against the fakes served over real sockets (the
test process runs on Trio and asyncio; the commands on the bot's default backend, and
`check` on both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from bot.cli import main
from bot.manifest import BOT_EVENTS, BOT_SCOPES
from tests.fakes import Behaviour, FakeOpenAI, FakeSlack, openai_server, slack_server
from tests.postgres import fresh_database

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parent.parent
BOT_TOKEN, APP_TOKEN, API_KEY = "xoxb-test-token", "xapp-test-token", "sk-test"
# Which scope each subscribed bot event needs (Slack refuses a manifest without them).
EVENT_SCOPES = {
    "app_mention": "app_mentions:read",
    "message.im": "im:history",
    "message.channels": "channels:history",
    "message.groups": "groups:history",
    "message.mpim": "mpim:history",
    "assistant_thread_started": "assistant:write",
    "assistant_thread_context_changed": "assistant:write",
}


def env_for(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": f"sqlite:///{tmp_path}/data/bot.db",
    }
    env.update(values)
    return env


async def run_cli(
    tmp_path: Path, args: list[str], env: dict[str, str], *, stdin: bytes = b"", timeout: float = 60.0
) -> tuple[int, str, str]:
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)  # no .env here: only what the test sets
    with anyio.fail_after(timeout):
        done = await anyio.run_process(
            [sys.executable, "-m", "bot", *args], input=stdin, env=env, cwd=str(workdir), check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# ---- manifest ----------------------------------------------------------------------------


def validate_manifest(manifest: dict, command: str) -> None:
    """The fields Slack requires, and the ones this bot cannot work without."""
    info = manifest["display_information"]
    assert 1 <= len(info["name"]) <= 35 and len(info.get("description", "")) <= 140
    features, settings = manifest["features"], manifest["settings"]
    assert 1 <= len(features["bot_user"]["display_name"]) <= 80
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True and "request_url" not in settings["interactivity"]
    assert "request_url" not in settings["event_subscriptions"]  # Socket Mode needs none
    home = features["app_home"]
    assert home["messages_tab_enabled"] is True and home["messages_tab_read_only_enabled"] is False
    assert home["home_tab_enabled"] is True
    agent = features["agent_view"]
    assert 0 < len(agent["agent_description"]) <= 300 and 1 <= len(agent["suggested_prompts"]) <= 4
    assert all(p["title"] and p["message"] for p in agent["suggested_prompts"])
    (slash,) = features["slash_commands"]
    assert slash["command"] == command and slash["description"] and "url" not in slash
    shortcuts = {s["callback_id"]: s for s in features["shortcuts"]}
    assert set(shortcuts) == {"summarize_thread", "translate_message", "thread_settings"}
    assert all(s["type"] == "message" and s["name"] and len(s["description"]) <= 80 for s in shortcuts.values())
    scopes, events = manifest["oauth_config"]["scopes"]["bot"], settings["event_subscriptions"]["bot_events"]
    assert set(events) >= {
        "app_mention",
        "message.im",
        "app_home_opened",
        "app_context_changed",
        "assistant_thread_started",
    }
    assert all(EVENT_SCOPES[e] in scopes for e in events if e in EVENT_SCOPES)
    assert {"commands", "chat:write", "assistant:write", "im:write"} <= set(scopes)
    assert len(scopes) == len(set(scopes)) and len(events) == len(set(events))


def test_manifest_is_valid_json_with_what_slack_requires(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "OPENAI_API_KEY", "SETTINGS_COMMAND"):
        monkeypatch.delenv(name, raising=False)
    assert main(["manifest", "--name", "Acme Helper"]) == 0  # needs no tokens at all
    manifest = json.loads(capsys.readouterr().out)
    validate_manifest(manifest, "/settings")
    assert manifest["display_information"]["name"] == "Acme Helper"
    assert manifest["oauth_config"]["scopes"]["bot"] == list(BOT_SCOPES)
    assert manifest["settings"]["event_subscriptions"]["bot_events"] == list(BOT_EVENTS)


async def test_manifest_from_the_real_process_uses_the_configured_command(tmp_path):
    code, out, err = await run_cli(tmp_path, ["manifest"], env_for(tmp_path, SETTINGS_COMMAND="/ask-settings"))
    assert code == 0, err
    validate_manifest(json.loads(out), "/ask-settings")


# ---- check -------------------------------------------------------------------------------


@pytest.fixture(params=["trio", "asyncio"])
def cli_backend(request):
    return request.param


async def test_check_passes_against_fakes_that_answer_right(tmp_path, cli_backend):
    slack, ai = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN), FakeOpenAI(api_key=API_KEY)
    async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
        env = env_for(
            tmp_path,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_APP_TOKEN=APP_TOKEN,
            OPENAI_API_KEY=API_KEY,
            SLACK_API_URL=slack_url,
            OPENAI_BASE_URL=openai_url,
            BOT_ASYNC_BACKEND=cli_backend,
        )
        code, out, err = await run_cli(tmp_path, ["check"], env)
    assert code == 0, out + err
    assert "All checks passed." in out and "FAIL" not in out
    for row in ("Slack bot token", "Slack app token", "OpenAI endpoint", "OpenAI model", "Database"):
        assert any(line.split()[:1] == ["ok"] and row in line for line in out.splitlines()), row
    assert [m for m, _ in slack.calls] == ["auth.test", "apps.connections.open"]
    assert (tmp_path / "data" / "bot.db").exists()
    for secret in (BOT_TOKEN, APP_TOKEN, API_KEY):
        assert secret not in out + err


@pytest.fixture
def postgres_url():
    yield from fresh_database()


async def test_check_takes_a_lease_on_postgresql_and_never_shows_the_password(tmp_path, postgres_url):
    slack, ai = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN), FakeOpenAI(api_key=API_KEY)
    # The throwaway server trusts local connections, so the password is not needed (nor sent).
    url = postgres_url.replace("://postgres@", "://postgres:hunter2-secret@", 1)
    assert "hunter2-secret" in url
    async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
        env = env_for(
            tmp_path,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_APP_TOKEN=APP_TOKEN,
            OPENAI_API_KEY=API_KEY,
            SLACK_API_URL=slack_url,
            OPENAI_BASE_URL=openai_url,
            DATABASE_URL=url,
        )
        code, out, err = await run_cli(tmp_path, ["check"], env)
    assert code == 0, out + err
    [line] = [line for line in out.splitlines() if "Database" in line]
    assert line.split()[0] == "ok" and "thread leases work" in line and "***@" in line
    assert "hunter2-secret" not in out + err


async def test_check_reports_each_problem_with_its_fix(tmp_path):
    slack = FakeSlack(bot_token="xoxb-the-real-one", app_token="xapp-the-real-one")
    ai = FakeOpenAI(api_key="sk-the-real-one")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the database directory should be")
    async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
        env = env_for(
            tmp_path,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_APP_TOKEN=APP_TOKEN,
            OPENAI_API_KEY=API_KEY,
            SLACK_API_URL=slack_url,
            OPENAI_BASE_URL=openai_url,
            DATABASE_URL=f"sqlite:///{blocker}/bot.db",
        )
        code, out, err = await run_cli(tmp_path, ["check"], env)
    assert code == 1, out + err
    lines = out.splitlines()

    def row(name: str) -> str:
        return next(line for line in lines if name in line and line.split()[0] in ("ok", "FAIL"))

    assert row("Slack bot token").split()[0] == "FAIL" and "invalid_auth" in row("Slack bot token")
    assert row("Slack app token").split()[0] == "FAIL" and "invalid_auth" in row("Slack app token")
    assert row("OpenAI endpoint").split()[0] == "FAIL" and "401" in row("OpenAI endpoint")
    assert row("OpenAI model").split()[0] == "FAIL"
    assert row("Database").split()[0] == "FAIL"
    assert out.count("fix:") == 5
    assert "5 check(s) failed." in out
    assert "Bot User OAuth Token" in out and "App-Level Tokens" in out and "OPENAI_API_KEY" in out
    for secret in (BOT_TOKEN, APP_TOKEN, API_KEY):
        assert secret not in out + err


async def test_check_names_the_models_when_the_configured_one_is_missing(tmp_path):
    slack, ai = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN), FakeOpenAI(api_key=API_KEY)
    async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
        env = env_for(
            tmp_path,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_APP_TOKEN=APP_TOKEN,
            OPENAI_API_KEY=API_KEY,
            SLACK_API_URL=slack_url,
            OPENAI_BASE_URL=openai_url,
            OPENAI_MODEL="gpt-nope",
        )
        code, out, _ = await run_cli(tmp_path, ["check"], env)
    assert code == 1
    assert "gpt-nope is not offered" in out and "Set OPENAI_MODEL to one of: gpt-4o-mini, gpt-5-mini" in out
    assert "1 check(s) failed." in out


async def test_check_without_any_configuration_lists_what_is_missing(tmp_path):
    env = env_for(tmp_path, OPENAI_BASE_URL="http://127.0.0.1:9/v1/")  # nothing listens on port 9
    code, out, _ = await run_cli(tmp_path, ["check"], env)
    assert code == 1
    assert "SLACK_BOT_TOKEN is not set" in out and "SLACK_APP_TOKEN is not set" in out
    assert "cannot reach" in out


async def test_check_reports_malformed_settings(tmp_path):
    code, out, _ = await run_cli(tmp_path, ["check"], env_for(tmp_path, ASYNC_TIMEOUT_SECONDS="soon"))
    assert code == 1 and "ASYNC_TIMEOUT_SECONDS must be a number" in out and "FAIL" in out


# ---- shell -------------------------------------------------------------------------------


async def test_shell_talks_to_the_pipeline_one_thread_per_conversation(tmp_path):
    ai = FakeOpenAI(api_key=API_KEY)
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\nThe launch is on Tuesday.\n")
    lines = [
        "hello there",
        "and a follow-up",
        "/new",
        "fresh start",
        f"/file {doc}",
        "when is the launch?",
        f"/file {tmp_path}/missing.txt",
        "/quit",
        "never sent",
    ]
    async with openai_server(ai) as openai_url:
        env = env_for(tmp_path, OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=openai_url)  # no Slack settings at all
        code, out, err = await run_cli(tmp_path, ["shell"], env, stdin=("\n".join(lines) + "\n").encode())
    assert code == 0, err
    assert "Echo: hello there" in out and "Echo: and a follow-up" in out and "Echo: fresh start" in out
    _first, follow, fresh, launch = ai.requests
    assert [m["role"] for m in follow["messages"]] == ["system", "user", "assistant", "user"]  # same thread
    assert [m["role"] for m in fresh["messages"]] == ["system", "user"]  # /new: a new thread
    assert "The launch is on Tuesday." in launch["messages"][-1]["content"]  # the attached file went along
    assert [m["role"] for m in launch["messages"]] == ["system", "user", "assistant", "user"]
    assert "Attached notes.md" in err and "missing.txt: cannot read it" in err
    assert len(ai.requests) == 4  # /quit ended it


async def test_shell_works_with_only_a_local_server_and_ends_at_end_of_input(tmp_path):
    ai = FakeOpenAI(api_key="no-key-needed")
    ai.enqueue(Behaviour(text="local answer"))
    async with openai_server(ai) as openai_url:
        env = env_for(tmp_path, OPENAI_BASE_URL=openai_url, BOT_ASYNC_BACKEND="asyncio")
        code, out, err = await run_cli(tmp_path, ["shell"], env, stdin=b"hi\n")
    assert code == 0, err
    assert out.strip() == "local answer"


async def test_shell_shows_failures_as_a_line(tmp_path):
    ai = FakeOpenAI(api_key=API_KEY)
    async with openai_server(ai) as openai_url:
        env = env_for(tmp_path, OPENAI_API_KEY="sk-wrong", OPENAI_BASE_URL=openai_url)
        code, out, err = await run_cli(tmp_path, ["shell"], env, stdin=b"hello\n")
    assert code == 0
    assert "API key" in out and "Traceback" not in out + err


async def test_shell_needs_a_key_or_a_server(tmp_path):
    code, _, err = await run_cli(tmp_path, ["shell"], env_for(tmp_path))
    assert code == 2 and "OPENAI_API_KEY is not set" in err and "OPENAI_BASE_URL" in err


# A stand-in for an installed aiohttp: importing it leaves a mark, then fails as a broken
# install would (the SDK then takes its "not installed" path either way).
FAKE_AIOHTTP = "import sys\nsys.aiohttp_imported = True\nraise ImportError('stand-in')\n"
PROBE = (
    "import sys\n"
    "{prepare}"
    "import bot.startup, openai\n"
    "openai.AsyncOpenAI(api_key='sk-test')\n"
    "print(getattr(sys, 'aiohttp_imported', False))\n"
)


@pytest.mark.parametrize(
    ("prepare", "imported"),
    [("", "True"), ("import bot.cli\nbot.cli._without_the_sdks_aiohttp_transport()\n", "False")],
)
def test_the_bot_keeps_the_sdks_aiohttp_transport_out(tmp_path, prepare, imported):
    """The run path marks the SDK's aiohttp transport absent, so an aiohttp installed
    beside the bot is never imported (its memory); the control shows the SDK would."""
    (tmp_path / "aiohttp").mkdir()
    (tmp_path / "aiohttp" / "__init__.py").write_text(FAKE_AIOHTTP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(prepare=prepare)], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == imported
