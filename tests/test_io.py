"""fsmooth.io: atomic writes survive a kill before the rename; the JSONL reader skips a torn last line."""
import json
import os
import signal
import subprocess
import sys

import pytest

from fsmooth.io import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic

_KILLED_BEFORE_RENAME = """
import os, signal, sys
import fsmooth.io as fio
target = sys.argv[1]

def killed(src, dst):  # the data is written and fsynced; the process dies before the rename
    os.kill(os.getpid(), signal.SIGKILL)

fio.os.replace = killed
fio.write_text_atomic(target, "new contents\\n")
"""


def test_atomic_write_survives_a_kill_between_write_and_rename(tmp_path):
    target = tmp_path / "report.md"
    write_text_atomic(target, "old contents\n")
    child = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RENAME, str(target)], capture_output=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert target.read_text() == "old contents\n"
    write_text_atomic(target, "new contents\n")  # the left-over temporary file does not block the next write
    assert target.read_text() == "new contents\n"


def test_atomic_write_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    import fsmooth.io as fio
    target = tmp_path / "meta.json"
    write_json_atomic(target, {"epoch": 1})

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"epoch": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_jsonl_reader_skips_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"epoch": 1})
    append_jsonl(log, {"epoch": 2})
    with open(log, "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash in the middle of an append
    with pytest.warns(RuntimeWarning, match="unreadable line 3 of"):
        assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}]
    assert read_jsonl(log, corrupt="skip") == [{"epoch": 1}, {"epoch": 2}]


def test_an_append_after_a_torn_line_keeps_the_new_record_whole(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"epoch": 1})
    with open(log, "a") as f:
        f.write('{"epoch": 2, "tr')  # a crash in the middle of an append
    append_jsonl(log, {"epoch": 2})  # the rerun's record
    append_jsonl(log, {"epoch": 3})
    assert log.read_text().splitlines()[1:] == ['{"epoch": 2, "tr', '{"epoch": 2}', '{"epoch": 3}']
    with pytest.warns(RuntimeWarning, match="line 2"):
        assert read_jsonl(log, corrupt="warn") == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]


def test_jsonl_reader_refuses_a_corrupt_middle_line_unless_told(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2 of .* is not JSON"):
        read_jsonl(log)
    with pytest.warns(RuntimeWarning, match="line 2"):
        assert read_jsonl(log, corrupt="warn") == [{"epoch": 1}, {"epoch": 3}]
    with pytest.raises(ValueError, match="corrupt must be"):
        read_jsonl(log, corrupt="ignore")


def test_atomic_writes_get_the_usual_permissions_whatever_the_library_creates(tmp_path):
    """mkstemp's file is private, and safetensors (0.8) replaces it with a private file of its own: every
    atomic write ends with the permissions a plain open() would give (0666 less the umask)."""
    import stat

    import torch
    from fsmooth.io import write_json_atomic, write_safetensors_atomic
    umask = os.umask(0)
    os.umask(umask)
    from fsmooth.checkpoint import save_checkpoint
    from fsmooth.models import WideResNet
    folder = save_checkpoint(tmp_path / "ck", WideResNet(10, 1, 10), {})
    for path in (write_safetensors_atomic(tmp_path / "t.safetensors", {"a": torch.rand(3)}),
                 write_json_atomic(tmp_path / "m.json", {"a": 1}), folder / "model.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path
