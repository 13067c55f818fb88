"""The embedded broker delivers every message even while a consumer races its producer."""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection

from ppml import fsbroker
from ppml.config import Settings
from ppml.queue import make_celery


def _connection(folder: Path) -> Connection:
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),  # kombu's default is ./control
        "store_processed": False,
        "polling_interval": 0.001,
    }
    return Connection("filesystem://", transport=fsbroker.TRANSPORT, transport_options=options)


def test_a_consumer_polling_as_fast_as_it_can_receives_every_message(tmp_path: Path) -> None:
    # arrange: kombu's own transport lost 5-16 % of these (an empty file read mid-write)
    sent = 1500
    received: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def consume() -> None:
        with _connection(tmp_path) as conn:
            queue = conn.SimpleQueue("q")
            while len(received) < sent and not (done.is_set() and not _pending(tmp_path)):
                try:
                    message = queue.get(block=True, timeout=0.01)
                except Empty:
                    continue
                except Exception as exc:  # a message lost in transit
                    errors.append(exc)
                    continue
                received.append(message.payload["i"])
                message.ack()

    consumer = threading.Thread(target=consume)
    consumer.start()
    # act
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("q")
        for i in range(sent):
            queue.put({"i": i})
    done.set()
    consumer.join(timeout=60)
    # assert
    assert errors == []
    assert sorted(received) == list(range(sent))


def _pending(folder: Path) -> bool:
    return any(path.name.endswith(".q.msg") for path in folder.iterdir())


def test_a_message_is_invisible_until_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arrange: look at the folder the moment before the rename that publishes a message
    # (a queue of its own: kombu remembers declared queues per process, not per folder)
    seen: list[Any] = []
    real_replace = fsbroker.os.replace

    def replace(src: str, dst: str) -> None:
        with _connection(tmp_path) as conn:
            try:
                seen.append(conn.default_channel._get("whole"))
            except Empty:
                seen.append(None)
        real_replace(src, dst)

    monkeypatch.setattr(fsbroker.os, "replace", replace)
    # act
    with _connection(tmp_path) as conn:
        conn.SimpleQueue("whole").put({"i": 1})
        monkeypatch.undo()
        message = conn.SimpleQueue("whole").get(timeout=1)
    # assert: nothing to consume before the rename, the whole message after it
    assert seen == [None]
    assert message.payload == {"i": 1}


def test_the_embedded_default_uses_the_atomic_transport(tmp_path: Path) -> None:
    app = make_celery(Settings(data_dir=tmp_path))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, fsbroker.Transport)
    redis = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    assert redis.conf.broker_transport is None
