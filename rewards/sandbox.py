"""Running model-written programs: a fresh temporary directory per run, resource
limits, every descendant contained and killed, and (where the machine has it) a
bubblewrap sandbox with no network, a read-only view of the system, its own PID
namespace and an unprivileged user.

Containment, in both modes:
- a PID namespace (bubblewrap's, or util-linux `unshare --pid --kill-child`): when
  its first process dies the kernel kills every process inside, including those
  that called setsid() to leave the process group;
- a pids cgroup per run where the machine lets us create one (cgroup v2 or v1):
  `pids.max` bounds a fork bomb, and every process left in it is killed at the end;
- rlimits: wall time (the caller's), CPU time, address space, file size, no core
  files, and RLIMIT_NPROC where no cgroup bounds the process count;
- output read as it comes, up to `max_output_bytes` (stdout and stderr together): past
  it the program is killed, so an endless print costs neither memory nor the deadline;
- a minimal environment (PATH, HOME): nothing of the worker's crosses, not even to the
  sandbox's own first process, whose /proc/1/environ the program can read;
- a reaper process per verifier process (`_ensure_reaper`) that outlives it: when the
  call's deadline SIGKILLs the verifier process mid-run (no `finally` runs), the reaper
  still kills and removes the run's cgroup and removes its directory.

With bubblewrap, everything the program can write is RAM of a bounded size: /tmp and
the work directory /tmp/work share one tmpfs of `disk_mb`, /dev/shm is a tmpfs of
SHM_MB, and /, /dev are read-only. Needs a bubblewrap that knows `--size` (0.8 does).

Without bubblewrap there is no filesystem isolation, and the network is cut only where
`unshare --net` works: the `code` verifier then refuses to run unless
`rewards.allow_unsandboxed_code` is set (and runs only when a PID namespace or a cgroup
can contain what the program starts). A worker running as root runs the program as
uid/gid 65534 there, with a Python that user can run: it reads only what any user may
(no other process's /proc/*/environ, no file of ours that is not world-readable), and
RLIMIT_NPROC applies to it. Its work directory is on disk, bounded per file only.
"""
from __future__ import annotations

import functools
import glob
import itertools
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from rewards import budget
from rewards.spawn import die_with_parent, minimal_env

_FENCE = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)
MAX_PROCS = 64
"""Processes (and threads) one program may have at a time."""
MAX_OUTPUT_BYTES = 2**20
"""What one run may write to stdout and stderr together before it is killed."""
SHM_MB = 8
"""Size of the sandbox's /dev/shm."""
NOBODY = 65534
"""The uid and gid programs run as (inside bubblewrap; outside it when we are root)."""
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/pids")
"""Where run cgroups are made: cgroup v2's one tree, v1's pids hierarchy."""
SANDBOX_ENV = {"PATH": "/usr/bin:/bin"}
"""All the environment bubblewrap itself gets (it sets the program's own)."""


class SandboxRefused(RuntimeError):
    """Model-written code cannot run here safely enough (and running it anyway was not allowed)."""


def extract_program(text: str) -> str | None:
    """The last fenced python block."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """"bwrap" when bubblewrap works here (tried once), else "none". The environment
    variable GRPO_CODE_SANDBOX=none forces the fallback (for tests)."""
    if os.environ.get("GRPO_CODE_SANDBOX") == "none":
        return "none"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "none"
    try:
        probe = subprocess.run([bwrap, *_bwrap_args(os.devnull, 1), "true"], capture_output=True, timeout=10,
                               env=SANDBOX_ENV)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return "bwrap" if probe.returncode == 0 else "none"


def _drops_privileges() -> bool:
    """Outside bubblewrap, programs run as NOBODY when we are root."""
    return os.geteuid() == 0


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _works(argv: list[str]) -> bool:
    """Whether `argv` runs and succeeds as the user programs run as (outside bubblewrap)."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=10, cwd="/", env=SANDBOX_ENV,
                              preexec_fn=_become_nobody if _drops_privileges() else None).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def _unshare() -> list[str] | None:
    """A PID-namespace wrapper for the fallback mode, if this machine allows one (with
    its own empty network where that works too)."""
    tool = shutil.which("unshare")
    if tool is None:
        return None
    for user in ([], ["--user", "--map-root-user"]):
        for net in (["--net"], []):
            argv = [tool, *user, *net, "--pid", "--fork", "--kill-child"]
            if _works([*argv, "true"]):
                return argv
    return None


@functools.lru_cache(maxsize=1)
def _fallback_python() -> str | None:
    """A Python for the fallback mode that the user programs run as can run: ours, or
    the system's where ours is out of its reach (under /root, say)."""
    for python in dict.fromkeys([_python(), shutil.which("python3", path="/usr/bin:/bin")]):
        if python and _works([python, "-I", "-c", "import subprocess"]):
            return python
    return None


_run_ids = itertools.count()


def _new_cgroup(max_procs: int) -> str | None:
    """A fresh pids cgroup limited to max_procs (v2 or v1), or None if we may not make one."""
    name = f"grpo-sandbox-{os.getpid()}-{next(_run_ids)}"
    candidates = []
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2: one tree
        candidates.append(CGROUP_ROOTS[0])
    candidates.append(CGROUP_ROOTS[1])
    for root in candidates:
        path = os.path.join(root, name)
        try:
            if root == CGROUP_ROOTS[0]:
                with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                    f.write("+pids")
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_procs))
            return path
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


def _kill_cgroup(path: str | None) -> None:
    """Kill every process in the cgroup (repeatedly: a fork bomb races us) and remove it."""
    if path is None:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(path, "cgroup.kill")):
            try:
                with open(os.path.join(path, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.02)


_reapers: dict[int, subprocess.Popen] = {}


def _ensure_reaper() -> None:
    """Start, once per process, `python -m rewards.sandbox reap PID`: in a session of its
    own (a kill of our process group spares it), it reads a pipe whose write end only
    we hold. However we die, the pipe then closes, and it removes what our runs left."""
    if os.getpid() not in _reapers:
        _reapers[os.getpid()] = subprocess.Popen(
            [sys.executable, "-m", "rewards.sandbox", "reap", str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=minimal_env(python=True), cwd="/")


def reap(pid: int) -> None:
    """The reaper: once process `pid` is gone (our stdin ends), kill and remove the run
    cgroups it left and remove its run directories."""
    sys.stdin.buffer.read()
    for root in CGROUP_ROOTS:
        for path in glob.glob(os.path.join(root, f"grpo-sandbox-{pid}-*")):
            _kill_cgroup(path)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"grpo-code-{pid}-*")):
        shutil.rmtree(path, ignore_errors=True)


def _python() -> str:
    """The base interpreter (not a venv's): the sandbox sees only the standard library."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _bwrap_args(program: str, disk_mb: int) -> list[str]:
    """The sandbox: `program` read-only at /tmp/work/main.py; /tmp (and the work dir in
    it) a tmpfs of disk_mb, /dev/shm one of SHM_MB; /, /dev and the system read-only."""
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--dev", "/dev", "--size", str(SHM_MB * 2**20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--proc", "/proc", "--size", str(disk_mb * 2**20), "--tmpfs", "/tmp", "--dir", "/tmp/work",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp/work",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    prefix = os.path.realpath(sys.base_prefix)
    for path in ["/usr", "/bin", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/alternatives", prefix]:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args + ["--ro-bind", program, "/tmp/work/main.py", "--remount-ro", "/", "--chdir", "/tmp/work"]


def _limits(cpu_s: float, memory_mb: int, file_mb: int, cgroup: str | None, max_procs: int, drop: bool):
    dies = die_with_parent()

    def apply() -> None:
        dies()  # a SIGKILLed verifier process takes its program along
        if cgroup is not None:  # join it before exec: everything started later is inside too
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = max(1, int(cpu_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop:  # last: joining the cgroup needs root
            _become_nobody()

    return apply


def _argv(mode: str, workdir: str, disk_mb: int) -> tuple[list[str], str | None, dict[str, str], bool]:
    """-> (argv, cwd, env, drop to NOBODY) of one run in `mode`; raises SandboxRefused
    when not allowed."""
    if mode == "bwrap":
        program = os.path.join(workdir, "main.py")
        return [shutil.which("bwrap"), *_bwrap_args(program, disk_mb), _python(), "-I", "/tmp/work/main.py"], \
            None, SANDBOX_ENV, False
    if os.environ.get("GRPO_ALLOW_UNSANDBOXED_CODE") != "1":
        raise SandboxRefused("bubblewrap is not available here, and model-written code does not run without it "
                             "unless rewards.allow_unsandboxed_code is true (no filesystem or network isolation)")
    python, drop = _fallback_python(), _drops_privileges()
    if python is None:
        raise SandboxRefused(f"no Python interpreter that uid {NOBODY} may run (ours is {_python()})")
    if drop:
        os.chown(workdir, NOBODY, NOBODY)
    return [*(_unshare() or []), python, "-I", "main.py"], workdir, {"PATH": "/usr/bin:/bin", "HOME": workdir}, drop


def _collect(proc: subprocess.Popen, data: bytes, timeout_s: float, max_bytes: int) -> tuple[bytes, bytes, str | None]:
    """Feed `data` to the program and read its stdout and stderr as they come, until it
    exits -> (stdout, stderr, None), or until the deadline or past `max_bytes` of output
    -> (what came so far, "timeout" or "output_limit"): the caller then kills it."""
    deadline = time.monotonic() + timeout_s
    out, err = bytearray(), bytearray()
    reading = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pending = memoryview(data)
    writing = [proc.stdin.fileno()] if pending else []
    os.set_blocking(proc.stdin.fileno(), False)
    if not pending:
        proc.stdin.close()
    while reading:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(err), "timeout"
        readable, writable, _ = select.select(list(reading), writing, [], left)
        if writable:
            try:
                pending = pending[os.write(writing[0], pending[:1 << 16]):]
            except BlockingIOError:
                pass
            except BrokenPipeError:  # it exited or closed its stdin without reading it all
                pending = pending[:0]
            if not pending:
                writing = []
                proc.stdin.close()
        for fd in readable:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del reading[fd]
                continue
            reading[fd].extend(chunk)
            if len(out) + len(err) > max_bytes:
                return bytes(out[:max_bytes]), bytes(err[-2000:]), "output_limit"
    try:  # both streams closed: wait for the exit within what is left of the deadline
        proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), "timeout"
    return bytes(out), bytes(err), None


def run_program(
    program: str, stdin: str, timeout_s: float = 5.0, cpu_s: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
    max_procs: int = MAX_PROCS, disk_mb: int = 64, max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> dict[str, Any]:
    """Run `program` once with `stdin`; -> {stdout, stderr, returncode, timed_out,
    output_limit, sandbox, seconds}. Everything it started is killed and its directory
    removed before this returns (or, if this process is killed first, by its reaper)."""
    mode = sandbox_mode()
    _ensure_reaper()
    workdir = tempfile.mkdtemp(prefix=f"grpo-code-{os.getpid()}-")
    cgroup = None
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(program)
        os.chmod(os.path.join(workdir, "main.py"), 0o644)
        argv, cwd, env, drop = _argv(mode, workdir, disk_mb)
        cgroup = _new_cgroup(max_procs)
        if mode == "none" and cgroup is None and not argv[0].endswith("unshare"):
            raise SandboxRefused("no PID namespace and no cgroup available: processes the program starts could outlive it")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True, preexec_fn=_limits(cpu_s, memory_mb, file_mb, cgroup, max_procs, drop),
        )
        try:
            out, err, stopped = _collect(proc, stdin.encode(), timeout_s, max_output_bytes)
        finally:
            _kill_session(proc)
            _kill_cgroup(cgroup)
            cgroup = None
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        return {
            "stdout": out.decode(errors="replace")[:100_000], "stderr": err.decode(errors="replace")[-2000:],
            "returncode": proc.returncode, "timed_out": stopped == "timeout", "output_limit": stopped == "output_limit",
            "sandbox": mode, "seconds": time.perf_counter() - t0,
        }
    finally:
        _kill_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the program's first process (its PID namespace dies with it) and its session."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), lambda: proc.kill()):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_tests(program: str, tests: list[dict[str, str]], timeout_s: float = 5.0, **limits) -> tuple[int, dict[str, Any]]:
    """-> (tests passed, info). A test passes when stdout matches `output` up to
    trailing whitespace on each line and at the end. Each test gets at most
    `timeout_s`, and never more than what is left of the verifier call's budget, so
    every test runs inside the call's deadline: a correct but slow program passes the
    tests that fit, instead of having the whole call killed."""
    passed, results = 0, []
    for test in tests:
        left = budget.remaining()
        limit = timeout_s if left is None else min(timeout_s, left)
        if limit < 0.05:
            results.append({"ok": False, "timed_out": True, "returncode": None, "skipped": "no time left in the call"})
            continue
        result = run_program(program, str(test.get("input", "")), timeout_s=limit,
                             **{**limits, "cpu_s": min(limits.get("cpu_s", 5.0), limit)})
        ok = (not result["timed_out"] and result["returncode"] == 0
              and _normal(result["stdout"]) == _normal(str(test["output"])))
        passed += ok
        results.append({"ok": ok, "timed_out": result["timed_out"], "returncode": result["returncode"],
                        **({"output_limit": True} if result["output_limit"] else {})})
    return passed, {"sandbox": sandbox_mode(), "tests": results}


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())



if __name__ == "__main__" and sys.argv[1:2] == ["reap"]:
    reap(int(sys.argv[2]))
