"""The two architectures users would otherwise run, for benchmarks/compare.py.

Both are written the way the Bolt and OpenAI docs lead people to write them, and read
the same settings as the bot (SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_API_URL,
OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL, ASYNC_TIMEOUT_SECONDS), so they talk to
the same fake Slack and fake OpenAI over real sockets. They need the `bench` extra.
"""
