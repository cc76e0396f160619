"""A process that imports torch, transformers, peft and pyro_lora once (about 11 s of CPU on 2 cores) and forks a
fresh process per job, for the tests that run code in processes of their own (the docs examples, the kill tests).

A job is a Python file run as ``__main__`` in a forked child: its own namespace, RNG, Pyro param store and process
group (a timeout kills the group), working directory ``FOLDER/work``, stdout and stderr in ``FOLDER/output.txt``,
exit code (``-9`` when killed by SIGKILL) in ``FOLDER/rc``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

_SERVER = r"""
import os, runpy, signal, sys, traceback
import pyro, pyro_lora, pyro_lora.data, pyro_lora.guides, pyro_lora.metrics, pyro_lora.pretrained
import pyro_lora.experiments.cli

def run(folder):
    os.chdir(os.path.join(folder, "work"))
    out = os.open(os.path.join(folder, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    try:
        runpy.run_path(os.path.join(folder, "job.py"), run_name="__main__")
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters reap themselves
for line in sys.stdin:
    folder = line.strip()
    waiter = os.fork()
    if waiter:
        print(waiter, flush=True)
        continue
    # the waiter: its own process group (killed whole on a timeout), the job in a child of its own
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    job = os.fork()
    if job == 0:
        os._exit(run(folder))
    status = os.waitpid(job, 0)[1]
    with open(os.path.join(folder, "rc.tmp"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(os.path.join(folder, "rc.tmp"), os.path.join(folder, "rc"))
    os._exit(0)
"""


class Job:
    """A forked job, with the part of ``subprocess.Popen`` the tests use (``returncode``, ``poll``, ``wait``, ``kill``)."""

    def __init__(self, pid: int, folder: Path):
        self.pid, self.folder, self.returncode = pid, folder, None

    def poll(self):
        if self.returncode is None and (self.folder / "rc").exists():
            self.returncode = int((self.folder / "rc").read_text())
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.perf_counter() + timeout
        while self.poll() is None:
            if deadline is not None and time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(str(self.folder), timeout)
            time.sleep(0.2)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.killpg(self.pid, 9)
            except ProcessLookupError:
                pass
            self.returncode = -9

    def output(self) -> str:
        return (self.folder / "output.txt").read_text(encoding="utf-8", errors="replace")


class Zygote:
    """The importing process, started on the first job; ``env``: its environment (and so every job's)."""

    def __init__(self, env: dict):
        self.env, self.process = env, None

    def start(self, code: str, folder: Path) -> Job:
        """Run ``code`` as ``__main__`` in a fresh fork, in ``folder`` (created; the job's files go there)."""
        (folder / "work").mkdir(parents=True, exist_ok=True)
        (folder / "job.py").write_text(code, encoding="utf-8")
        if self.process is None or self.process.poll() is not None:
            (folder.parent / "zygote.py").write_text(_SERVER, encoding="utf-8")
            self.process = subprocess.Popen([sys.executable, str(folder.parent / "zygote.py")], env=self.env, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.process.stdin.write(f"{folder}\n")
        self.process.stdin.flush()
        pid = self.process.stdout.readline().strip()
        if not pid:
            raise RuntimeError(f"the zygote exited with {self.process.wait()} before forking the job of {folder}")
        return Job(int(pid), folder)

    def close(self):
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process = None
