"""folder_lock: one process (one thread) at a time writes a run folder."""

import os
import subprocess
import sys

import pytest
from conftest import LOCKING_ALONE, held_by_another_process

from pyro_lora.locking import folder_lock, locked_elsewhere


@pytest.mark.parametrize("left", ["999999999", "-1", "9" * 40, "", "\udcff"])
def test_a_lock_file_a_gone_process_left_is_no_lock(tmp_path, left):
    """The lock is the kernel's and goes with its process: whatever a killed run left in ``.lock`` (its id, an id
    since reused, an id os.kill reads as "every process", a half-written file) does not hold the folder."""
    (tmp_path / ".lock").write_bytes(left.encode("utf-8", "surrogateescape"))
    with folder_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_two_processes_racing_for_a_lock_never_both_hold_it(tmp_path):
    """Processes taking one folder's lock at once, over and over: never two inside at the same time."""
    code = LOCKING_ALONE + """
import os, time
from pathlib import Path
inside, overlaps = Path(sys.argv[1]) / "inside", 0
for _ in range(300):
    try:
        with folder_lock(sys.argv[1]):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL)  # fails if the other process is inside too
            os.close(fd)
            time.sleep(0.0005)
            os.unlink(inside)
    except ValueError:
        pass
    except FileExistsError:
        overlaps += 1
print(overlaps)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["0", "0", "0"]


def test_another_thread_of_this_process_is_another_holder(tmp_path):
    """The lock was re-entrant for the whole process: two threads running a comparison into one folder both held it."""
    import threading

    from pyro_lora.locking import locked_elsewhere

    seen = []

    def other():
        seen.append(locked_elsewhere(tmp_path))
        try:
            with folder_lock(tmp_path, "this run folder"):
                seen.append("held")
        except ValueError as error:
            seen.append(str(error))

    with folder_lock(tmp_path, "this run folder"):
        assert not locked_elsewhere(tmp_path)  # this thread's own
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen[0] is True and seen[1].startswith(f"process {os.getpid()} is writing this run folder")


@pytest.mark.parametrize("kind", ["folder", "unreadable"])
def test_a_lock_that_is_no_file_is_refused_by_name(tmp_path, kind):
    if kind == "folder":
        (tmp_path / ".lock").mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        (tmp_path / ".lock").write_text("1")
        (tmp_path / ".lock").chmod(0)
    with pytest.raises(ValueError, match=r"\.lock cannot be opened as this folder's lock file \(.*\): remove it"):
        with folder_lock(tmp_path):
            pass


def test_a_lock_that_is_a_link_or_a_pipe_is_refused_and_its_target_left_alone(tmp_path):
    """A .lock linked to a file had that file truncated and overwritten with a process id; a pipe gave a raw OSError
    and kept the descriptor open."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's notes")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(ValueError, match=r"\.lock cannot be opened as this folder's lock file \(.*\): remove it"):
        with folder_lock(folder):
            pass
    assert victim.read_text() == "the user's notes"
    (folder / ".lock").unlink()
    os.mkfifo(folder / ".lock")
    with pytest.raises(ValueError, match=r"\.lock is not a regular file, so it cannot be this folder's lock file: remove it"):
        with folder_lock(folder):
            pass
    assert not locked_elsewhere(folder)


def test_a_folder_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match=r"run is a file, where a folder is to be written: move it"):
        with folder_lock(tmp_path / "run"):
            pass


def test_leaving_the_lock_never_frees_another_holders(tmp_path):
    """Leaving removed whatever .lock was at the path: after someone deleted the file, a second process locked a new
    one, and the first, leaving, deleted that one: a third got in beside the second."""
    first = folder_lock(tmp_path)
    first.__enter__()
    (tmp_path / ".lock").unlink()  # deleted by hand while held
    with held_by_another_process(tmp_path) as second:
        first.__exit__(None, None, None)  # the first leaves while the second holds the new file
        with pytest.raises(ValueError, match=f"process {second} is writing"):
            with folder_lock(tmp_path):
                pass
        assert locked_elsewhere(tmp_path)


def test_a_probe_never_makes_a_writer_refuse(tmp_path):
    """locked_elsewhere holds the lock for an instant: a writer starting then was refused, naming a dead process."""
    (tmp_path / ".lock").write_text("777777")
    code = LOCKING_ALONE + "print('probing', flush=True)\nwhile True: locked_elsewhere(sys.argv[1])"
    prober = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline() == "probing\n"
        for _ in range(200):
            with folder_lock(tmp_path):
                pass
    finally:
        prober.kill()
        prober.wait()


def test_a_forked_child_is_another_holder(tmp_path):
    """A child forked inside the block took the parent's lock as its own."""
    read, write = os.pipe()
    with folder_lock(tmp_path, "this run folder"):
        child = os.fork()
        if child == 0:
            try:
                with folder_lock(tmp_path, "this run folder"):
                    os.write(write, b"held")
            except ValueError:
                os.write(write, b"refused")
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    assert os.read(read, 16) == b"refused"


def test_a_forked_child_that_outlives_the_block_does_not_keep_the_lock(tmp_path):
    """A child forked inside the block (a DataLoader worker) inherited the lock and held it after the parent left:
    the next writer was refused, naming the parent."""
    read, write = os.pipe()
    started, ready = os.pipe()
    with folder_lock(tmp_path):
        child = os.fork()
        if child == 0:
            os.write(ready, b"r")  # running: what it inherited at the fork is settled
            os.read(read, 1)  # alive until the parent says
            os._exit(0)
        assert os.read(started, 1) == b"r"
    try:
        assert not locked_elsewhere(tmp_path)
        with folder_lock(tmp_path):
            pass
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
