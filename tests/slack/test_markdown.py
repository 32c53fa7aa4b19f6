"""Splitting long answers for Slack, and the small Markdown → mrkdwn conversion."""

from bot.slack.markdown import markdown_to_mrkdwn, split_markdown


def test_short_text_is_one_part():
    assert split_markdown("hello", 100) == ["hello"]


def test_parts_respect_the_limit_and_keep_all_words():
    text = " ".join(f"word{i}" for i in range(3000))
    parts = split_markdown(text, 1000)
    assert len(parts) > 1
    assert all(len(p) <= 1000 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_code_block_split_is_closed_and_reopened():
    code = "\n".join(f"print({i})" for i in range(400))
    text = "Intro\n\n```python\n" + code + "\n```\n\nOutro"
    parts = split_markdown(text, 1000)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 1000
        fences = [line for line in part.splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, part  # every part renders its code as code
    assert parts[1].startswith("```python\n")
    body = [line for p in parts for line in p.splitlines() if line.startswith("print(")]
    assert body == code.splitlines()


def test_mrkdwn_conversion():
    md = "# Title\n**bold** and [link](https://x.io) & <tag>\n> quoted\n`**code**`"
    out = markdown_to_mrkdwn(md).splitlines()
    assert out[0] == "*Title*"
    assert out[1] == "*bold* and <https://x.io|link> &amp; &lt;tag&gt;"
    assert out[2] == "> quoted"
    assert out[3] == "`**code**`"
