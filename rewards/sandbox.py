"""Running model-written programs: a fresh temporary directory per run, resource
limits, and (where the machine has it) a bubblewrap sandbox with no network, a
read-only view of the system, its own PID namespace and an unprivileged user.

Without bubblewrap the program still gets wall-time, CPU-time, memory and file-size
limits, its own session (every process it starts is killed at the end) and its own
working directory, but the network and the rest of the filesystem are NOT isolated:
`sandbox_mode()` says which is in effect and every result reports it.
"""
from __future__ import annotations

import functools
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

_FENCE = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)


def extract_program(text: str) -> str | None:
    """The last fenced python block."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """"bwrap" when bubblewrap works here (tried once), else "rlimit"."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "rlimit"
    try:
        probe = subprocess.run([bwrap, *_bwrap_args("/tmp"), "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "rlimit"
    return "bwrap" if probe.returncode == 0 else "rlimit"


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


def _limits(cpu_s: float, memory_mb: int, file_mb: int):
    def apply() -> None:
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = max(1, int(cpu_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(
    program: str, stdin: str, timeout_s: float = 5.0, cpu_s: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
) -> dict[str, Any]:
    """Run `program` once with `stdin`; -> {stdout, stderr, returncode, timed_out, sandbox, seconds}.
    Everything it started is killed and its directory removed before this returns."""
    mode = sandbox_mode()
    workdir = tempfile.mkdtemp(prefix="grpo-code-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(program)
        if mode == "bwrap":
            os.chmod(workdir, 0o777)
            argv = [shutil.which("bwrap"), *_bwrap_args(workdir), _python(), "-I", "/tmp/work/main.py"]
            cwd = None
        else:
            argv, cwd = [_python(), "-I", "main.py"], workdir
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_limits(cpu_s, memory_mb, file_mb),
            env=None if mode == "bwrap" else {"PATH": "/usr/bin:/bin", "HOME": workdir},
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = b"", b""
        finally:
            _kill_session(proc)
        if timed_out:
            proc.communicate()
        return {
            "stdout": out.decode(errors="replace")[:100_000], "stderr": err.decode(errors="replace")[-2000:],
            "returncode": proc.returncode, "timed_out": timed_out, "sandbox": mode,
            "seconds": time.perf_counter() - t0,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the program's whole session (children that outlive it included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_tests(program: str, tests: list[dict[str, str]], **limits) -> tuple[int, dict[str, Any]]:
    """-> (tests passed, info). A test passes when stdout matches `output` up to
    trailing whitespace on each line and at the end."""
    passed, results = 0, []
    for test in tests:
        result = run_program(program, str(test.get("input", "")), **limits)
        ok = (not result["timed_out"] and result["returncode"] == 0
              and _normal(result["stdout"]) == _normal(str(test["output"])))
        passed += ok
        results.append({"ok": ok, "timed_out": result["timed_out"], "returncode": result["returncode"]})
    return passed, {"sandbox": sandbox_mode(), "tests": results}


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())
