"""Fixtures shared by the in-process tests: a fresh fake Slack and fake OpenAI per test.
A module that needs a differently configured fake overrides the fixture locally."""

import pytest

from tests.fakes.openai import FakeOpenAI
from tests.fakes.slack import FakeSlack


@pytest.fixture
def slack():
    return FakeSlack()


@pytest.fixture
def ai():
    return FakeOpenAI()
