"""Baseline 2: Bolt `AsyncApp` + `AsyncSocketModeHandler` (aiohttp), `AsyncOpenAI`,
`asyncio.wait_for` as the request deadline, an `asyncio.Lock` per Slack thread.

The asyncio version of baseline 1, as Bolt's async docs lead people to write it: the
same placeholder, streamed completion, ~1 s `chat_update` pacing, busy reply and final
text; the whole answer runs under `asyncio.wait_for(..., ASYNC_TIMEOUT_SECONDS)`.

    python benchmarks/baselines/bolt_async.py    # settings from the environment
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from openai import AsyncOpenAI
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
log = logging.getLogger("bolt_async")

TIMEOUT = float(os.environ.get("ASYNC_TIMEOUT_SECONDS", "60"))
MODEL = os.environ.get("OPENAI_MODEL", "gpt-5-mini")
SYSTEM = "You are a helpful assistant in a Slack workspace."

web = AsyncWebClient(
    token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ.get("SLACK_API_URL", AsyncWebClient.BASE_URL)
)
app = AsyncApp(client=web)
ai = AsyncOpenAI(api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ.get("OPENAI_BASE_URL"))

locks: dict[str, asyncio.Lock] = {}


async def history(client: AsyncWebClient, channel: str, thread_ts: str, bot_user: str) -> list[dict]:
    replies = (await client.conversations_replies(channel=channel, ts=thread_ts))["messages"]
    return [
        {"role": "assistant" if m.get("user") == bot_user else "user", "content": m.get("text", "")}
        for m in replies[:-1]
    ]


async def stream_answer(client: AsyncWebClient, channel: str, placeholder: str, messages: list[dict]) -> str:
    text, last_update = "", time.monotonic()
    stream = await ai.chat.completions.create(model=MODEL, messages=messages, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            if time.monotonic() - last_update >= 1.0:
                await client.chat_update(channel=channel, ts=placeholder, text=text)
                last_update = time.monotonic()
    return text


async def answer(event: dict, client: AsyncWebClient, context) -> None:
    channel, ts = event["channel"], event["ts"]
    thread_ts = event.get("thread_ts") or ts
    lock = locks.setdefault(f"{channel}/{thread_ts}", asyncio.Lock())
    if lock.locked():
        await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text="Still working on your last message…")
        return
    async with lock:
        placeholder = (await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text="_Thinking…_"))["ts"]
        messages = [{"role": "system", "content": SYSTEM}]
        if event.get("thread_ts"):
            messages += await history(client, channel, thread_ts, context.bot_user_id)
        messages.append({"role": "user", "content": event.get("text", "")})
        try:
            text = await asyncio.wait_for(stream_answer(client, channel, placeholder, messages), TIMEOUT)
        except TimeoutError:
            text = f"Sorry, no answer within {TIMEOUT:g}s."
        except Exception as exc:
            log.warning("OpenAI call failed: %s", type(exc).__name__)
            text = f"Sorry, something went wrong ({type(exc).__name__})."
        await client.chat_update(channel=channel, ts=placeholder, text=text or "(empty answer)")


@app.event("message")
async def on_message(event, client, context):
    if event.get("subtype") or event.get("bot_id") or event.get("channel_type") != "im":
        return
    await answer(event, client, context)


@app.event("app_mention")
async def on_mention(event, client, context):
    await answer(event, client, context)


async def main() -> None:
    await AsyncSocketModeHandler(app, os.environ["SLACK_APP_TOKEN"]).start_async()


if __name__ == "__main__":
    asyncio.run(main())
