"""Baseline 1: Bolt `App` + `SocketModeHandler` (built-in client, 10 worker threads), the
sync `OpenAI` client, a `threading.Lock` per Slack thread.

How the Bolt getting-started guide and most blog posts build a ChatGPT bot: a listener
per event, run on a thread pool; a placeholder, a streamed completion pushed with
`chat_update` about once a second, and the final text. A thread that is busy gets a
"still working" reply. The OpenAI client's `timeout` is the request deadline (no SDK
retries, so it means the same as the bot's ASYNC_TIMEOUT_SECONDS). Bolt's listener pool
is 5 threads by default; it is given 10 here to match the socket handler's 10 workers
(what "10 worker threads" means in practice), which only helps this baseline.

    python benchmarks/baselines/bolt_sync.py     # settings from the environment
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI
from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
log = logging.getLogger("bolt_sync")

WORKERS = 10
TIMEOUT = float(os.environ.get("ASYNC_TIMEOUT_SECONDS", "60"))
MODEL = os.environ.get("OPENAI_MODEL", "gpt-5-mini")
SYSTEM = "You are a helpful assistant in a Slack workspace."

web = WebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ.get("SLACK_API_URL", WebClient.BASE_URL))
app = App(client=web, listener_executor=ThreadPoolExecutor(max_workers=WORKERS))
ai = OpenAI(
    api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ.get("OPENAI_BASE_URL"), timeout=TIMEOUT, max_retries=0
)

locks: dict[str, threading.Lock] = {}
locks_guard = threading.Lock()


def thread_lock(key: str) -> threading.Lock:
    with locks_guard:
        return locks.setdefault(key, threading.Lock())


def history(client: WebClient, channel: str, thread_ts: str, bot_user: str) -> list[dict]:
    replies = client.conversations_replies(channel=channel, ts=thread_ts)["messages"]
    return [
        {"role": "assistant" if m.get("user") == bot_user else "user", "content": m.get("text", "")}
        for m in replies[:-1]
    ]


def answer(event: dict, client: WebClient, context) -> None:
    channel, ts = event["channel"], event["ts"]
    thread_ts = event.get("thread_ts") or ts
    lock = thread_lock(f"{channel}/{thread_ts}")
    if not lock.acquire(blocking=False):
        client.chat_postMessage(channel=channel, thread_ts=thread_ts, text="Still working on your last message…")
        return
    try:
        placeholder = client.chat_postMessage(channel=channel, thread_ts=thread_ts, text="_Thinking…_")["ts"]
        messages = [{"role": "system", "content": SYSTEM}]
        if event.get("thread_ts"):
            messages += history(client, channel, thread_ts, context.bot_user_id)
        messages.append({"role": "user", "content": event.get("text", "")})
        text, last_update = "", time.monotonic()
        try:
            stream = ai.chat.completions.create(model=MODEL, messages=messages, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    if time.monotonic() - last_update >= 1.0:
                        client.chat_update(channel=channel, ts=placeholder, text=text)
                        last_update = time.monotonic()
        except Exception as exc:
            log.warning("OpenAI call failed: %s", type(exc).__name__)
            text = f"Sorry, something went wrong ({type(exc).__name__})."
        client.chat_update(channel=channel, ts=placeholder, text=text or "(empty answer)")
    finally:
        lock.release()


@app.event("message")
def on_message(event, client, context):
    if event.get("subtype") or event.get("bot_id") or event.get("channel_type") != "im":
        return
    answer(event, client, context)


@app.event("app_mention")
def on_mention(event, client, context):
    answer(event, client, context)


if __name__ == "__main__":
    SocketModeHandler(app, os.environ["SLACK_APP_TOKEN"], concurrency=WORKERS).start()
