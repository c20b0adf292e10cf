"""The state directory: records survive a round trip, hold their key privately, and one gateway
at a time holds the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.state_dir import ServerRecord, StateDir, StateDirInUse, command_hash

RECORD = ServerRecord("org/chat#1", 4242, 987654, "sk-secret", "abc", port=23456)


def test_a_record_comes_back_as_it_was_saved(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.save(RECORD)
    uds = ServerRecord("embed", 4343, 1, "sk-other", "def", uds="/run/x/0.sock")
    state.save(uds)
    assert state.records() == [uds, RECORD]  # in the order of their file names
    assert RECORD.url == "http://127.0.0.1:23456"


def test_the_directory_and_its_records_are_the_gateway_users_alone(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.save(RECORD)
    assert (state.path.stat().st_mode & 0o777) == 0o700
    assert [p.stat().st_mode & 0o777 for p in state.path.iterdir()] == [0o600]


def test_saving_again_replaces_the_record_and_remove_forgets_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save(RECORD)
    moved = ServerRecord(RECORD.label, 5000, 2, "sk-new", "abc", port=1)
    state.save(moved)
    assert state.records() == [moved]
    state.remove(RECORD.label)
    state.remove(RECORD.label)  # a second time is no error
    assert state.records() == []


def test_a_file_that_is_not_a_record_is_dropped(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save(RECORD)
    (tmp_path / "cut.json").write_text('{"label": "cut", "pgid"')
    (tmp_path / "other.json").write_text('{"label": "x"}')
    assert state.records() == [RECORD]
    assert not (tmp_path / "cut.json").exists()


def test_one_gateway_at_a_time_holds_the_directory(tmp_path: Path) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    first.lock()
    with pytest.raises(StateDirInUse, match="another running gateway"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_the_command_hash_changes_with_the_command_or_the_environment_only() -> None:
    base = command_hash(["vllm", "serve", "m", "--max-model-len", "512"], {"A": "1", "B": "2"})
    assert base == command_hash(
        ["vllm", "serve", "m", "--max-model-len", "512"], {"B": "2", "A": "1"}
    )
    assert base != command_hash(
        ["vllm", "serve", "m", "--max-model-len", "256"], {"A": "1", "B": "2"}
    )
    assert base != command_hash(["vllm", "serve", "m", "--max-model-len", "512"], {"A": "1"})
