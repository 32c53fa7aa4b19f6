"""Everything that speaks Slack's wire formats: the WebSocket client and the Socket Mode
reader (Slack in), event parsing, the Web API client with its rate-limit budgets, and
file transfer (Slack out). Nothing outside this package builds a Slack request."""
