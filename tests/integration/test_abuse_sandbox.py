"""Abuse of the reward side with real processes and real bubblewrap: model-written code
hunting for the worker's secrets, an endless print, filling the disk, a verifier
process SIGKILLed mid-run, a `grpo verify` killed while its child hangs in an import,
broken external verifiers, verifier modules that fail to import, and info that JSON
and msgpack cannot carry."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import msgpack
import pytest

from rewards.api import ErrorStreak, VerifierError
from rewards.config import RewardConfig
from rewards.protocol import HEADER, encode
from rewards.sandbox import CGROUP_ROOTS, run_program, sandbox_mode
from rewards.worker import RewardWorker, child_argv, preflight_external
from rollout.types import Group, Sample
from tests.helpers import EXAMPLES, ROOT, TESTS, free_port, grpo

EXAMPLE = str(EXAMPLES / "external_verifier.py")
PLUGINS = str(TESTS / "abuse_plugins.py")


def group(completions, **row):
    return Group([1], "p", row, [Sample([1] * 3, [0.0] * 3, c, "stop", [(0, 0)]) for c in completions])


def code_answer(body: str) -> str:
    return f"<think>t</think><answer>```python\n{body}\n```</answer>"


def pids_with(*markers: str) -> list[int]:
    """Live (not zombie) processes whose command line holds every one of `markers`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if all(m.encode() in cmd for m in markers) and state != "Z" and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


# ------------------------------------------------------------- 6: the environment
SNOOP = """
import os
secret, read, leaked = {secret!r}, 0, []
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
    try:
        with open(f"/proc/{{pid}}/environ", "rb") as f:
            blob = f.read()
    except OSError:
        continue
    read += 1
    if secret.encode() in blob:
        leaked.append(pid)
if secret in repr(dict(os.environ)):
    leaked.append("os.environ")
print("clean" if read and not leaked else f"read {{read}}, leaked in {{leaked}}")
"""


@pytest.mark.parametrize("mode", ["bwrap", "none"])
def test_model_code_finds_no_secret_of_the_worker(monkeypatch, mode):
    secret = f"grpo-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("GRPO_TEST_SECRET", secret)
    if mode == "none":
        monkeypatch.setenv("GRPO_CODE_SANDBOX", "none")
    w = RewardWorker(RewardConfig(verifiers={"code": {"weight": 1.0, "timeout_s": 30}}, allow_unsandboxed_code=True,
                                  concurrency=1))
    try:
        [g] = w.score([group([code_answer(SNOOP.format(secret=secret))], tests=[{"input": "", "output": "clean"}])])
        assert g.reward_info["code"][0]["sandbox"] == mode
        assert g.rewards == [1.0], g.reward_info
        child = w.slots[0]["code"][0].proc.pid  # the verifier process itself, and its sandbox reaper
        for pid in [child, *pids_with(f"reap\x00{child}\x00")]:
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert secret.encode() not in f.read()
    finally:
        w.close()


def test_plug_in_and_external_verifiers_hold_no_secret_of_the_worker(monkeypatch):
    secret = f"grpo-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("GRPO_TEST_SECRET", secret)
    probe = "tests.abuse_plugins:environ_probe"
    w = RewardWorker(RewardConfig(verifiers={probe: 1.0, "ext": 1.0}, concurrency=1,
                                  external={"ext": {"command": [sys.executable, PLUGINS]}}))
    try:
        [g] = w.score([group(["x"], secret=secret)])
        assert g.reward_parts == {probe: [1.0], "ext": [1.0]}, g.reward_info
        assert "GRPO_TEST_SECRET" not in g.reward_info[probe][0]["names"]
        assert g.reward_info[probe][0]["home"] != os.environ.get("HOME")
    finally:
        w.close()


def test_the_config_names_what_else_crosses(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_PASSED", "named in the config")
    probe = "tests.abuse_plugins:environ_probe"
    cfg = RewardConfig(verifiers={probe: {"weight": 1.0, "env": ["GRPO_TEST_PASSED"]}, "ext": 1.0, "bare": 1.0},
                       external={"ext": {"command": [sys.executable, PLUGINS], "env": ["GRPO_TEST_PASSED"]},
                                 "bare": {"command": [sys.executable, PLUGINS]}}, concurrency=1)
    w = RewardWorker(cfg)
    try:
        [g] = w.score([group(["x"], secret="unused")])
        assert g.reward_info[probe][0]["passed"] == "named in the config"
        assert "grpo-verifier-home-" in g.reward_info[probe][0]["home"]  # a throwaway HOME
        assert g.reward_info["ext"][0]["passed"] == "named in the config"
        assert g.reward_info["bare"][0]["passed"] is None
        assert g.reward_info["ext"][0]["raw"] == "\\xfe\\xff"  # msgpack bytes from a program: text
    finally:
        w.close()


# ------------------------------------------------------------ 7: limits that held
def test_an_endless_print_is_cut_without_memory_or_the_deadline():
    w = RewardWorker(RewardConfig(verifiers={"code": {"weight": 1.0, "timeout_s": 20, "args": {"timeout_s": 6}}},
                                  concurrency=1, cache_size=0))
    try:
        w.score([group(["warm-up: no program"], tests=[])])
        t0 = time.perf_counter()
        [g] = w.score([group([code_answer("while True:\n    print('x' * 1000)")], tests=[{"input": "", "output": "x"}])])
        elapsed = time.perf_counter() - t0
        with open(f"/proc/{w.slots[0]['code'][0].proc.pid}/status") as f:
            peak_kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
        assert g.rewards == [0.0] and g.reward_stats["timeouts"] == 0 and g.reward_stats["errors"] == 0
        assert g.reward_info["code"][0]["tests"][0].get("output_limit") is True
        assert elapsed < 4, elapsed  # cut at the output cap, not at the program's 6 s limit
        assert peak_kb < 200 * 1024, f"the verifier process peaked at {peak_kb // 1024} MiB"
    finally:
        w.close()


FILL = """
import os
for d in ["/tmp", "/tmp/work", "/dev/shm", "/dev", "/"]:  # /tmp/work: the working directory
    written = 0
    try:
        for i in range(40):
            with open(os.path.join(d, f"fill-{i}"), "wb") as f:
                f.write(b"x" * 4 * 2**20)
            written += 4
    except OSError:
        pass
    print(d, written)
"""


def test_what_a_program_writes_is_bounded_in_total():
    sandbox_mode.cache_clear()
    assert sandbox_mode() == "bwrap"
    result = run_program(FILL, "", timeout_s=20, cpu_s=20)
    written = dict(line.rsplit(" ", 1) for line in result["stdout"].splitlines())
    written = {d: int(mb) for d, mb in written.items()}
    assert len(written) == 5, result
    assert written["/tmp"] + written["/tmp/work"] <= 64, written  # one tmpfs of disk_mb (64) for both
    assert written["/dev/shm"] <= 8 and written["/dev"] == 0 and written["/"] == 0, written


def test_a_verifier_process_killed_mid_run_leaves_nothing_behind(tmp_path):
    marker = f"grpo_marker_{uuid.uuid4().hex}"
    before = set(glob.glob("/tmp/grpo-code-*"))
    child = subprocess.Popen(child_argv({"code": {"target": "code", "args": {"timeout_s": 120, "cpu_s": 120}}}),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        (length,) = HEADER.unpack(child.stdout.read(HEADER.size))
        assert msgpack.unpackb(child.stdout.read(length))["ready"] is True
        program = code_answer(f"import subprocess, sys\n"
                              f"subprocess.run([sys.executable, '-c', 'import time; time.sleep(300)  # {marker}'])")
        child.stdin.write(encode({"id": 1, "verifier": "code", "completion": program, "timeout_s": 120,
                                  "fields": {"tests": [{"input": "", "output": "x"}]}}))
        child.stdin.flush()
        wait_until(lambda: pids_with(marker), 30, "the program to run")
        cgroups = [p for root in CGROUP_ROOTS for p in glob.glob(f"{root}/grpo-sandbox-{child.pid}-*")]
        workdirs = set(glob.glob("/tmp/grpo-code-*")) - before
        assert workdirs
        os.killpg(child.pid, signal.SIGKILL)  # what the worker does at a call's deadline: no `finally` runs
        child.wait()

        def gone():
            left = [p for p in cgroups + sorted(workdirs) if os.path.exists(p)]
            return not left and not pids_with(marker)

        wait_until(gone, 15, "the run's cgroup, directory and processes to go")
    finally:
        for pid in pids_with(marker):
            os.kill(pid, signal.SIGKILL)
        child.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="a worker that is not root cannot run programs as anyone else")
def test_an_unsandboxed_program_runs_as_nobody(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CODE_SANDBOX", "none")
    private = tmp_path / "private.txt"
    private.write_text("project secret")
    private.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    body = (f"import os\nout = []\nfor path in [{str(private)!r}, '/proc/{os.getpid()}/environ']:\n"
            "    try:\n        open(path).read()\n        out.append('read')\n"
            "    except OSError:\n        out.append('denied')\nprint(*out)")
    w = RewardWorker(RewardConfig(verifiers={"code": {"weight": 1.0, "timeout_s": 30}}, allow_unsandboxed_code=True))
    try:
        [g] = w.score([group([code_answer(body)], tests=[{"input": "", "output": "denied denied"}])])
        assert g.reward_info["code"][0]["sandbox"] == "none" and g.rewards == [1.0], g.reward_info
    finally:
        w.close()


# --------------------------------------------------------------- 10: orphans
def test_a_child_hanging_in_import_dies_with_grpo_verify(tmp_path):
    marker = f"grpo_marker_{uuid.uuid4().hex}"
    (tmp_path / "hangs_at_import.py").write_text("import time\ntime.sleep(600)\n\ndef f(c, fields):\n    return 1.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    verify = subprocess.Popen(grpo("verify", "--verifier", "hangs_at_import:f", "--completion", "x",
                                   "--args", json.dumps({"marker": marker})),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        [child] = wait_until(lambda: pids_with(marker, "rewards.child"), 60, "the verifier process")
        verify.kill()
        verify.wait()
        wait_until(lambda: not pids_with(marker, "rewards.child"), 5, f"verifier process {child} to die with its parent")
    finally:
        for pid in pids_with(marker):
            os.kill(pid, signal.SIGKILL)
        verify.kill()


# ----------------------------------------------------- 11: broken external verifiers
@pytest.mark.parametrize("entry, fragment", [
    ({"command": ["/nonexistent"]}, "No such file"),
    ({"command": [sys.executable, "-c", "pass"]}, "closed|exited"),
    ({"command": [sys.executable, "-c", "import time; time.sleep(60)"]}, "timed out"),
    ({"command": [sys.executable, "-c", "import sys; sys.exit(1)"], "ready": True}, "did not start"),
    ({"address": f"127.0.0.1:{free_port()}"}, "could not start"),
])
def test_preflight_names_a_broken_external_verifier(entry, fragment):
    cfg = RewardConfig(verifiers={"broken": {"weight": 1.0, "timeout_s": 1.0}, "format": 1.0},
                       external={"broken": entry, "fine": {"command": [sys.executable, EXAMPLE]}})
    t0 = time.perf_counter()
    with pytest.raises(VerifierError) as e:
        preflight_external(cfg)
    assert "external verifier 'broken'" in str(e.value) and re.search(fragment, str(e.value)), str(e.value)
    assert time.perf_counter() - t0 < 20


def test_preflight_passes_working_external_verifiers():
    port = free_port()
    server = subprocess.Popen([sys.executable, EXAMPLE, "--port", str(port)])
    try:
        wait_until(lambda: subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}))"],
                                          capture_output=True).returncode == 0, 20, "the server")
        preflight_external(RewardConfig(verifiers={"a": 1.0, "b": 1.0},
                                        external={"a": {"command": [sys.executable, EXAMPLE], "verifier": "exact"},
                                                  "b": {"address": f"127.0.0.1:{port}"}}))
    finally:
        server.kill()


def test_a_verifier_failing_on_every_sample_stops_the_run():
    cfg = RewardConfig(verifiers={"gone": 1.0, "format": 1.0, "tests.abuse_plugins:own_error": 1.0},
                       external={"gone": {"command": ["/nonexistent"]}}, concurrency=1)
    w, streak = RewardWorker(cfg), ErrorStreak(cfg.max_error_steps)
    try:
        for step in range(cfg.max_error_steps - 1):
            streak.update(w.score([group([f"a {step}", f"b {step}"])]))
        groups = w.score([group(["c", "d"])])
        own = groups[0].reward_info["tests.abuse_plugins:own_error"][0]  # answered, with an `error` of its own
        assert own == {"verifier_error": "no answer in the completion"}
        with pytest.raises(VerifierError) as e:
            streak.update(groups)
        assert "verifier 'gone' failed on every sample for 3 consecutive steps" in str(e.value)
        assert "No such file or directory: '/nonexistent'" in str(e.value)
    finally:
        w.close()


# ------------------------------------------------------- 13: one line, not a traceback
@pytest.mark.parametrize("source, what", [
    ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("def f(:\n    pass\n", "SyntaxError"),
])
def test_grpo_verify_reports_a_broken_module_in_one_line(tmp_path, source, what):
    module = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(grpo("verify", "--verifier", f"{module}:f", "--completion", "x"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert what in lines[0] and str(tmp_path / f"{module}.py") in lines[0] and f"'{module}:f'" in lines[0]


def test_info_json_and_msgpack_cannot_carry_breaks_neither_scoring_nor_the_record():
    from cluster.artifacts.record import group_record

    name = "tests.abuse_plugins:bytes_info"
    w = RewardWorker(RewardConfig(verifiers={name: 1.0}, concurrency=1))
    try:
        [g] = w.score([group(["x"])])
    finally:
        w.close()
    assert g.rewards == [1.0] and g.reward_stats["errors"] == 0, g.reward_info
    assert g.reward_info[name][0]["raw"] == "\\xff\x00ok" and g.reward_info[name][0]["keys"] == {"1": "one", "[2, 3]": "pair"}
    record = group_record(g, [0.0], trained=True, dropped=None)
    assert msgpack.unpackb(msgpack.packb(record), raw=False)["samples"][0]["info"][name] == g.reward_info[name][0]
    proc = subprocess.run(grpo("verify", "--verifier", name, "--completion", "x"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["info"]["tags"] == ["a"]
