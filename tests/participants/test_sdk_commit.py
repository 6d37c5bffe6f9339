"""The commit primitive against a real Redis: stream writes and deletes in one atomic call."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from contracts import naming
from participants.sdk.commit import Commit, CommitScript, Outcome
from participants.sdk.consumer import Entry, create_groups, dead_letter_commit


async def add(redis: Redis, stream: str, fields: dict[str, str]) -> str:
    entry_id: Any = await redis.xadd(stream, dict[Any, Any](fields))
    return str(entry_id.decode())


async def entries(redis: Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    found: Any = await redis.xrange(stream)
    return [(entry_id.decode(), fields) for entry_id, fields in found]


async def test_a_commit_appends_and_deletes_stream_entries_and_returns_the_new_ids(redis: Redis) -> None:
    source, target = naming.dead_letter_stream(3), naming.message_stream(3, "Ping")
    doomed = await add(redis, source, {"n": "1"})
    kept = await add(redis, source, {"n": "2"})

    commit = Commit().xadd(target, {"a": "1"}).xadd(target, {"b": b"2"}).xdel(source, doomed)
    [result] = await CommitScript().run(redis, [commit])

    assert result.outcome is Outcome.OK
    appended = await entries(redis, target)
    assert result.added == tuple(entry_id for entry_id, _ in appended)
    assert [fields for _, fields in appended] == [{b"a": b"1"}, {b"b": b"2"}]
    assert [entry_id for entry_id, _ in await entries(redis, source)] == [kept]


async def test_deleting_an_entry_that_is_gone_changes_nothing_else(redis: Redis) -> None:
    stream = naming.dead_letter_stream(0)
    kept = await add(redis, stream, {"n": "1"})

    [result] = await CommitScript().run(redis, [Commit().xdel(stream, "1-1")])

    assert (result.outcome, result.added) == (Outcome.OK, ())
    assert [entry_id for entry_id, _ in await entries(redis, stream)] == [kept]


def test_a_delete_in_another_hash_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="hash slot"):
        Commit().xadd(naming.message_stream(0, "Ping"), {"a": "1"}).xdel(naming.dead_letter_stream(1), "1-0")


async def test_commits_go_on_after_the_server_lost_the_script(redis: Redis) -> None:
    script = CommitScript()
    stream = naming.message_stream(0, "Ping")
    [first] = await script.run(redis, [Commit().xadd(stream, {"n": "1"})])
    await redis.script_flush()  # as a restarted server without persistence would have it

    results = await script.run(redis, [Commit().xadd(stream, {"n": "2"}), Commit().xadd(stream, {"n": "3"})])

    assert [result.outcome for result in (first, *results)] == [Outcome.OK] * 3
    assert [fields for _, fields in await entries(redis, stream)] == [{b"n": b"1"}, {b"n": b"2"}, {b"n": b"3"}]


def guarded(key: str, seen: str, version: int) -> Commit:
    """A commit of version ``version + 1`` of hash ``key``, deduplicated on message m-1."""
    return Commit().guard(key, version).dedupe(seen, "m-1").hset(key, {"v": str(version + 1)})


async def test_a_guarded_commit_tells_a_duplicate_of_itself_from_another_commits(redis: Redis) -> None:
    key, seen = naming.instance_key(2, "wf"), naming.seen_key(2, "wf")
    script = CommitScript()
    first = guarded(key, seen, 0)
    [applied] = await script.run(redis, [first])
    assert first.landed(applied)
    assert first.token is not None
    assert await redis.hget(key, "c") == first.token.encode()  # stamped

    [again] = await script.run(redis, [first])  # its script run again (a reply lost and retried)
    other = guarded(key, seen, 0)  # the same message decided elsewhere: another commit
    [theirs] = await script.run(redis, [other])

    assert (again.outcome, theirs.outcome) == (Outcome.DUPLICATE, Outcome.DUPLICATE)
    assert first.landed(again)
    assert not other.landed(theirs)
    assert await redis.hget(key, "v") == b"1"


async def test_a_duplicate_of_an_unguarded_commit_is_plain(redis: Redis) -> None:
    record = naming.outcome_key(2, "payment", "m-1")
    commit = Commit().once(record, "[]")
    [_, again] = await CommitScript().run(redis, [commit, commit])
    assert (again.outcome, again.value, again.guarded_by) == (Outcome.DUPLICATE, "[]", None)
    assert commit.token is None
    assert not commit.landed(again)


async def test_a_guard_refuses_the_same_version_written_by_another_commit(redis: Redis) -> None:
    key = naming.instance_key(2, "wf")
    script = CommitScript()
    first = Commit().guard(key, 0).hset(key, {"v": "1"})
    await script.run(redis, [first])
    assert first.token is not None
    [stale] = await script.run(redis, [Commit().guard(key, 1, "another-commit").hset(key, {"v": "2"})])
    [fresh] = await script.run(redis, [Commit().guard(key, 1, first.token).hset(key, {"v": "2"})])
    assert (stale.outcome, stale.value) == (Outcome.CONFLICT, "1")
    assert fresh.outcome is Outcome.OK


async def test_a_dead_letter_run_again_after_it_landed_is_not_written_twice(redis: Redis) -> None:
    stream = naming.message_stream(0, "Ping")
    entry_id = await redis.xadd(stream, {"type": "Ping"})
    await create_groups(redis, [(stream, "echo")])
    await redis.xreadgroup("echo", "c-1", {stream: ">"})
    entry = Entry(stream, entry_id if isinstance(entry_id, str) else entry_id.decode(), {b"type": b"Ping"})
    letter = dead_letter_commit(entry, "echo", "c-1", "gave up")

    first, again = await CommitScript().run(redis, [letter, letter])  # as a retry after a lost reply sends it

    assert (first.outcome, again.outcome) == (Outcome.OK, Outcome.DUPLICATE)
    assert await redis.xlen(naming.dead_letter_stream(0)) == 1
    assert (await redis.xpending(stream, "echo"))["pending"] == 0
