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
  files, and RLIMIT_NPROC where no cgroup bounds the process count.

Without bubblewrap there is no filesystem or network isolation: the `code` verifier
then refuses to run unless `rewards.allow_unsandboxed_code` is set (and runs only
when a PID namespace or a cgroup can contain what the program starts).
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from rewards import budget

_FENCE = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)
MAX_PROCS = 64
"""Processes (and threads) one program may have at a time."""


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
        probe = subprocess.run([bwrap, *_bwrap_args("/tmp"), "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return "bwrap" if probe.returncode == 0 else "none"


@functools.lru_cache(maxsize=1)
def _unshare() -> list[str] | None:
    """A PID-namespace wrapper for the fallback mode, if this machine allows one."""
    tool = shutil.which("unshare")
    if tool is None:
        return None
    for argv in ([tool, "--pid", "--fork", "--kill-child"],
                 [tool, "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]):
        try:
            if subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0:
                return argv
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


_run_ids = itertools.count()


def _new_cgroup(max_procs: int) -> str | None:
    """A fresh pids cgroup limited to max_procs (v2 or v1), or None if we may not make one."""
    name = f"grpo-sandbox-{os.getpid()}-{next(_run_ids)}"
    candidates = []
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2: one tree
        candidates.append("/sys/fs/cgroup")
    candidates.append("/sys/fs/cgroup/pids")  # v1: the pids hierarchy
    for root in candidates:
        path = os.path.join(root, name)
        try:
            if root == "/sys/fs/cgroup":
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


def _python() -> str:
    """The base interpreter (not a venv's): the sandbox sees only the standard library."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _bwrap_args(workdir: str) -> list[str]:
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--uid", "65534", "--gid", "65534",
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp/work",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    prefix = os.path.realpath(sys.base_prefix)
    for path in ["/usr", "/bin", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/alternatives", prefix]:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args + ["--bind", workdir, "/tmp/work", "--chdir", "/tmp/work"]


def _limits(cpu_s: float, memory_mb: int, file_mb: int, cgroup: str | None, max_procs: int):
    def apply() -> None:
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

    return apply


def _argv(mode: str, workdir: str) -> tuple[list[str], str | None, dict[str, str] | None]:
    """-> (argv, cwd, env) of one run in `mode`; raises SandboxRefused when not allowed."""
    if mode == "bwrap":
        os.chmod(workdir, 0o777)
        return [shutil.which("bwrap"), *_bwrap_args(workdir), _python(), "-I", "/tmp/work/main.py"], None, None
    if os.environ.get("GRPO_ALLOW_UNSANDBOXED_CODE") != "1":
        raise SandboxRefused("bubblewrap is not available here, and model-written code does not run without it "
                             "unless rewards.allow_unsandboxed_code is true (no filesystem or network isolation)")
    wrapper = _unshare() or []
    return [*wrapper, _python(), "-I", "main.py"], workdir, {"PATH": "/usr/bin:/bin", "HOME": workdir}


def run_program(
    program: str, stdin: str, timeout_s: float = 5.0, cpu_s: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
    max_procs: int = MAX_PROCS,
) -> dict[str, Any]:
    """Run `program` once with `stdin`; -> {stdout, stderr, returncode, timed_out, sandbox, seconds}.
    Everything it started is killed and its directory removed before this returns."""
    mode = sandbox_mode()
    workdir = tempfile.mkdtemp(prefix="grpo-code-")
    cgroup = None
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(program)
        argv, cwd, env = _argv(mode, workdir)
        cgroup = _new_cgroup(max_procs)
        if mode == "none" and cgroup is None and not argv[0].endswith("unshare"):
            raise SandboxRefused("no PID namespace and no cgroup available: processes the program starts could outlive it")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_limits(cpu_s, memory_mb, file_mb, cgroup, max_procs), env=env,
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = b"", b""
        finally:
            _kill_session(proc)
            _kill_cgroup(cgroup)
            cgroup = None
        if timed_out:
            proc.communicate()
        return {
            "stdout": out.decode(errors="replace")[:100_000], "stderr": err.decode(errors="replace")[-2000:],
            "returncode": proc.returncode, "timed_out": timed_out, "sandbox": mode,
            "seconds": time.perf_counter() - t0,
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
        results.append({"ok": ok, "timed_out": result["timed_out"], "returncode": result["returncode"]})
    return passed, {"sandbox": sandbox_mode(), "tests": results}


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())
