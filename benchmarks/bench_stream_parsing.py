"""CPU per streamed answer of the bot's OpenAI read path against the SDK's typed one.

Both read the same answers from the fake OpenAI (real SSE bytes, through the SDK's
httpx2 client on an in-process transport, so no sockets or other processes share the
figure): the SDK's `client.chat.completions.create(stream=True)`, which transforms the
parameters through their type annotations and builds a pydantic `ChatCompletionChunk`
per chunk, and `bot.processing.openai_chat.stream_chat`, which posts the plain JSON
parameters through the SDK's own request path and reads each chunk as the JSON the SDK
parsed. Runs alternate, so the machine's load falls on both alike.

    python benchmarks/bench_stream_parsing.py [--streams 400] [--chunks 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.openai_client import openai_client
from bot.processing.openai_chat import stream_chat
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.harness import test_settings

MESSAGES = [{"role": "user", "content": "Tell me about structured concurrency."}]


async def sdk_typed(client, n: int) -> None:
    for _ in range(n):
        stream = await client.chat.completions.create(
            model="gpt-5-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=4000,
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pass


async def bot_plain(client, n: int) -> None:
    for _ in range(n):
        await stream_chat(
            client, model="gpt-5-mini", messages=MESSAGES, max_tokens=4000, idle_timeout=30.0, on_delta=lambda _: None
        )


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    ai = FakeOpenAI(api_key="sk-test")
    text = " ".join(f"word{i}" for i in range(args.chunks * 3))
    ai.script = lambda request: Behaviour(text=text, chunks=args.chunks)
    results: dict[str, list[float]] = {"SDK typed stream": [], "bot (plain JSON chunks)": []}
    async with openai_client(
        test_settings().openai, transport=httpx2.MockTransport(ai.handle), max_retries=0
    ) as client:
        await sdk_typed(client, 5)
        await bot_plain(client, 5)
        for _ in range(args.rounds):
            for name, run in (("SDK typed stream", sdk_typed), ("bot (plain JSON chunks)", bot_plain)):
                start = time.process_time()
                await run(client, args.streams)
                results[name].append((time.process_time() - start) / args.streams * 1000)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=400, help="answers per round and path")
    parser.add_argument("--chunks", type=int, default=40, help="content chunks per answer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=("trio", "asyncio"), default="trio")
    args = parser.parse_args()
    results = anyio.run(measure, args, backend=args.backend)
    print(f"{args.streams} answers of {args.chunks} chunks per round, {args.rounds} rounds, {args.backend}")
    print("(CPU of this process: the fake OpenAI's share is the same for both paths)")
    base = statistics.median(results["SDK typed stream"])
    for name, values in results.items():
        median = statistics.median(values)
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:26s} {median:6.2f} ms CPU per answer  ({spread})  ×{median / base:.2f}")


if __name__ == "__main__":
    main()
