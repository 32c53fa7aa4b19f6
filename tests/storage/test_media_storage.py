"""The thread-images part of the Store interface, on SQLite, on both backends."""

from __future__ import annotations

import pytest

from bot.storage import ThreadKey, open_store
from bot.storage.base import ThreadImage

pytestmark = pytest.mark.anyio


def image(name: str, source: str = "user", data: bytes = b"\xff\xd8\xff jpeg") -> ThreadImage:
    return ThreadImage(
        name=name,
        mime="image/jpeg",
        data=data,
        width=10,
        height=20,
        source=source,
        label=f"label of {name}",
        ts="1.000100",
    )


async def test_images_come_back_newest_last_and_are_trimmed_per_thread(tmp_path):
    path = tmp_path / "bot.db"
    thread, other = ThreadKey("D1", "1.0"), ThreadKey("D1", "2.0")
    store = await open_store(f"sqlite:///{path}")
    try:
        await store.add_thread_images(thread, [image("a"), image("b")], keep=3)
        await store.add_thread_images(other, [image("x")], keep=3)
        await store.add_thread_images(thread, [image("c", "bot"), image("d")], keep=3)
        assert [i.name for i in await store.thread_images(thread, limit=10)] == ["b", "c", "d"]  # "a" trimmed
        assert [i.name for i in await store.thread_images(thread, limit=2)] == ["c", "d"]
        assert await store.thread_images(thread, limit=0) == []
        assert [i.name for i in await store.thread_images(other, limit=10)] == ["x"]
    finally:
        await store.aclose()
    reopened = await open_store(f"sqlite:///{path}")  # the migration applied once; the bytes survive
    try:
        [c, d] = await reopened.thread_images(thread, limit=2)
        assert c == image("c", "bot") and d.data == b"\xff\xd8\xff jpeg"
    finally:
        await reopened.aclose()


async def test_a_bad_source_is_refused_whole():
    from bot.storage import StorageError

    store = await open_store("sqlite:///:memory:")
    try:
        with pytest.raises(StorageError):
            await store.add_thread_images(ThreadKey("D1", "1.0"), [image("ok"), image("bad", source="robot")], keep=5)
        assert await store.thread_images(ThreadKey("D1", "1.0"), limit=5) == []  # one transaction: nothing kept
    finally:
        await store.aclose()
