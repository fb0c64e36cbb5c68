import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from shapkern.runlock import LOCK_FILE, FolderInUseError, FolderLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = textwrap.dedent(  # loads runlock.py alone: no torch import, a fast start
    """
    import importlib.util, time
    spec = importlib.util.spec_from_file_location("runlock", {root!r} + "/shapkern/runlock.py")
    runlock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runlock)
    runlock.FolderLock({folder!r}).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def hold_in_another_process(folder) -> subprocess.Popen:
    """A process that takes the lock of ``folder`` and keeps it until it is killed."""
    code = HOLDER.format(root=ROOT, folder=str(folder))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_and_a_killed_holder_releases_it(tmp_path):
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(FolderInUseError, match="in use by another shapkern process") as info:
            FolderLock(tmp_path / "run").acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the lock file stays behind
        holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()
    with FolderLock(tmp_path / "run"):  # the OS released it with the process
        assert f"pid {os.getpid()}" in (tmp_path / "run" / LOCK_FILE).read_text()


def test_the_lock_is_reentrant_within_a_process_and_released_by_the_last_hold(tmp_path):
    outer = FolderLock(tmp_path).acquire()
    with FolderLock(tmp_path):  # the CLI holds it, the Trainer takes it again
        pass
    holder = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(120)", "").format(root=ROOT, folder=str(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert holder.returncode != 0 and "FolderInUseError" in holder.stderr  # still held by the outer hold
    outer.release()
    outer.release()  # a second release is a no-op
    holder = hold_in_another_process(tmp_path)
    holder.kill()
    holder.wait()


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write in the output folder .*file/run"):
        FolderLock(tmp_path / "file" / "run").acquire()  # a path below a file

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("shapkern.runlock.tempfile.mkstemp", read_only)  # root ignores chmod
    with pytest.raises(OSError, match="cannot write in the output folder .*: Read-only file system"):
        FolderLock(tmp_path / "ro").acquire()
    monkeypatch.undo()
    with FolderLock(tmp_path / "ro"):  # the failed attempt kept nothing
        pass


def test_explain_refuses_an_output_folder_in_use(tmp_path, capsys):
    from shapkern.cli import main

    holder = hold_in_another_process(tmp_path / "expl")
    try:
        argv = [
            "explain",
            "--checkpoint",
            str(tmp_path / "c.pt"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "expl"),
        ]
        assert main(argv) == 2
        assert f"in use by another shapkern process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
