"""The reward worker: isolated verifier processes, timeouts, crashes, the code
sandbox, external verifiers over msgpack, the cache."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from rewards.config import RewardConfig
from rewards.peer import ProcessPeer
from rewards.sandbox import sandbox_mode
from rewards.worker import RewardWorker
from rollout.types import Group, Sample
from tests.helpers import EXAMPLES, TESTS

EXAMPLE = str(EXAMPLES / "external_verifier.py")
NAN_VERIFIER = str(TESTS / "nan_verifier.py")


def group(completions, **row):
    return Group([1], "p", row, [Sample([1] * 3, [0.0] * 3, c, "stop", 0) for c in completions])


def make(verifiers, **kw):
    return RewardWorker(RewardConfig(verifiers=verifiers, **kw))


def test_weighted_sum_and_parts():
    w = make({"accuracy": 1.0, "format": 0.5})
    [g] = w.score([group(["<think>x</think><answer>4</answer>", "<answer>4</answer>", "<think>x</think><answer>5</answer>"], answer="4")])
    assert g.reward_parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert g.rewards == [1.5, 1.0, 0.5]
    assert g.reward_stats == {"timeouts": 0, "errors": 0, "cache_hits": 0}
    w.close()


def test_answer_classes_are_computed_in_the_verifier_process():
    w = make({"math": 1.0, "format": 0.2})
    assert w.answer_classes("math", [["1/2", "0.5", None], ["3", "x", "3.0"]]) == [[0, 0, None], [0, 1, 0]]
    assert w.answer_classes("accuracy", [["1/2", "0.5", "\\frac{1}{2}"]]) == [[0, 0, 2]]  # registered, not served here
    w.close()


def test_math_blowup_times_out_and_costs_one_sample():
    w = make({"math": {"weight": 1.0, "timeout_s": 3.0}})
    t0 = time.perf_counter()
    [g] = w.score([group(["<answer>2</answer>", "<answer>9^{9^{9^{9}}}</answer>", "<answer>2</answer>"], answer="2")])
    elapsed = time.perf_counter() - t0
    assert g.rewards == [1.0, 0.0, 1.0]
    assert g.reward_stats["timeouts"] == 1 and w.restarts() == 1
    assert elapsed < 3.0 + 20  # one timeout plus two verifier-process start-ups
    w.close()


def test_countdown_power_tower_is_rejected_without_evaluating():
    w = make({"countdown": 1.0})
    t0 = time.perf_counter()
    [g] = w.score([group(["<answer>9**9**9**9</answer>", "<answer>9*9-9*9</answer>"], numbers=[9, 9, 9, 9], target=0)])
    assert g.rewards == [0.0, 1.0] and g.reward_stats["timeouts"] == 0
    assert time.perf_counter() - t0 < 10
    w.close()


def test_crash_raise_and_print_are_contained():
    w = make({"tests.reward_plugins:crash": 1.0, "tests.reward_plugins:raises": 1.0, "tests.reward_plugins:chatty": 1.0})
    [g] = w.score([group(["fine", "crash now", "raise now", "fine again"])])
    assert g.reward_parts["tests.reward_plugins:crash"] == [1.0, 0.0, 1.0, 1.0]
    # the next call after the crash runs in a fresh process
    assert g.reward_parts["tests.reward_plugins:raises"] == [1.0, 1.0, 0.0, 1.0]
    assert g.reward_parts["tests.reward_plugins:chatty"] == [0.5, 0.5, 0.5, 0.5]
    assert g.reward_stats["errors"] == 2
    assert w.restarts() == 1
    w.close()


def test_cache_answers_repeated_samples():
    w = make({"tests.reward_plugins:sleepy": {"weight": 1.0, "timeout_s": 1.0}}, concurrency=1)
    groups = w.score([group(["a", "a", "a"])])
    assert groups[0].reward_stats["cache_hits"] == 2 and groups[0].rewards == [1.0, 1.0, 1.0]
    [g] = w.score([group(["sleep", "sleep"])])  # timeouts are not cached: both cost their sample
    assert g.reward_stats["timeouts"] == 2 and g.rewards == [0.0, 0.0]
    w.close()


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


def code_answer(body: str) -> str:
    return f"<think>t</think><answer>```python\n{body}\n```</answer>"


def test_code_scores_fraction_of_tests():
    tests = [{"input": "2 3\n", "output": "5"}, {"input": "1 1\n", "output": "2\n"}, {"input": "0 0", "output": "1"}]
    w = make({"code": {"weight": 1.0, "timeout_s": 60}})
    [g] = w.score([group([code_answer("a, b = map(int, input().split())\nprint(a + b)"), "no program"], tests=tests)])
    assert g.rewards == pytest.approx([2 / 3, 0.0])
    w.close()


def test_code_sandbox_contains_hostile_programs(tmp_path):
    marker = f"grpo_marker_{uuid.uuid4().hex}"
    outside = tmp_path / f"{marker}.txt"
    os.chmod(tmp_path, 0o777)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    programs = {
        "loop": f"# {marker}\nwhile True:\n    pass",
        "memory": f"# {marker}\nx = bytearray(8 * 1024 ** 3)\nprint('ok')",
        "children": (f"import subprocess, sys\nps = [subprocess.Popen([sys.executable, '-c', "
                     f"'import time; time.sleep(300)  # {marker}']) for _ in range(3)]\n[p.wait() for p in ps]\nprint('ok')"),
        "write": f"open({str(outside)!r}, 'w').write('escaped')\nprint('ok')",
        "socket": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   f"s.sendall(b'{marker}')\nprint('ok')"),
    }
    w = make({"code": {"weight": 1.0, "timeout_s": 60, "args": {"timeout_s": 3, "cpu_s": 2, "memory_mb": 256}}})
    # a program that leaves sleeping children behind and exits: correct output, nothing left over
    orphans = (f"import subprocess, sys\nfor _ in range(3):\n    subprocess.Popen([sys.executable, '-c', "
               f"'import time; time.sleep(300)  # {marker}'], start_new_session=True)\nprint('ok')")
    completions = [code_answer(p) for p in programs.values()] + [code_answer(orphans)]
    [g] = w.score([group(completions, tests=[{"input": "", "output": "ok"}])])
    info = dict(zip([*programs, "orphans"], g.reward_parts["code"]))
    assert sandbox_mode() == "bwrap", "bubblewrap is expected on this machine (scripts/setup.sh installs it)"
    assert info == {**{name: 0.0 for name in programs}, "orphans": 1.0}
    assert not outside.exists()
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
    time.sleep(0.5)
    assert _leftover_processes(marker) == []
    assert not [d for d in os.listdir("/tmp") if d.startswith("grpo-code-")]
    w.close()


def test_external_verifier_over_stdio_and_tcp():
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    server = subprocess.Popen([sys.executable, EXAMPLE, "--port", str(port)])
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        w = make({"exact": 1.0, "exact_tcp": 0.5, "format": 0.1},
                 external={"exact": {"command": [sys.executable, EXAMPLE]},
                           "exact_tcp": {"address": f"127.0.0.1:{port}", "verifier": "exact"}})
        [g] = w.score([group(["<think>a</think><answer>42</answer>", "<answer>41</answer>"], answer="42")])
        assert g.reward_parts == {"exact": [1.0, 0.0], "exact_tcp": [1.0, 0.0], "format": [1.0, 0.0]}
        assert g.rewards == pytest.approx([1.6, 0.0])
        w.close()
    finally:
        server.kill()


@pytest.mark.parametrize(
    "script, fragment",
    [
        ("import sys; sys.stdin.buffer.read(4); sys.stdout.buffer.write(b'\\x00\\x00\\x00\\x05garba'); sys.stdout.flush(); import time; time.sleep(9)", "malformed"),
        ("import sys; sys.stdin.buffer.read(4); sys.stdout.buffer.write(b'\\x7f\\xff\\xff\\xff'); sys.stdout.flush(); import time; time.sleep(9)", "exceeds the limit"),
        ("import sys; sys.exit(0)", "closed the stream"),
    ],
)
def test_bad_peers_are_rejected_and_restarted(script, fragment):
    peer = ProcessPeer([sys.executable, "-c", script])
    first = peer.call("v", "text", {}, timeout_s=5)
    assert first["kind"] == "error" and fragment in first["error"], first
    second = peer.call("v", "text", {}, timeout_s=5)  # a fresh process answers (and fails the same way)
    assert second["kind"] == "error" and peer.restarts == 2
    peer.close()


def test_oversized_request_is_rejected_before_sending():
    peer = ProcessPeer([sys.executable, EXAMPLE], max_frame=1000)
    result = peer.call("exact", "x" * 5000, {"answer": "1"}, timeout_s=5)
    assert result["kind"] == "error" and "exceeds the limit" in result["error"]
    assert peer.call("exact", "<answer>1</answer>", {"answer": "1"}, timeout_s=5)["score"] == 1.0
    peer.close()


def test_grpo_verify_cli_keeps_order_and_reports_errors(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        '{"completion": "<answer>\\\\frac{1}{2}</answer>", "answer": "0.5"}\n'
        '{"completion": "<answer>3</answer>", "answer": "0.5"}\n'
        '{"completion": "crash", "answer": "1"}\n'
        '{"completion": "<answer>1</answer>", "answer": "1"}\n'
    )
    out = tmp_path / "scores.jsonl"
    cmd = [sys.executable, "-m", "cluster.cli", "verify", "--verifier", "tests.reward_plugins:crash"]
    proc = subprocess.run(cmd + ["--input", str(cases), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert rows[2]["error"] and ("exited" in rows[2]["error"] or "closed" in rows[2]["error"])
    assert [r["error"] for r in rows[:2] + rows[3:]] == [None, None, None]

    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "verify", "--verifier", "math", "--input", str(cases)],
                          capture_output=True, text=True, timeout=120)
    assert [json.loads(line)["score"] for line in proc.stdout.splitlines()] == [1.0, 0.0, 0.0, 1.0]

    one = subprocess.run([sys.executable, "-m", "cluster.cli", "verify", "--verifier", "countdown",
                          "--completion", "<answer>(1+2)*3</answer>", "--field", "numbers=[1,2,3]", "--field", "target=9"],
                         capture_output=True, text=True, timeout=120)
    assert json.loads(one.stdout) == {"score": 1.0, "error": None, "info": {"value": "9"}}

    cases.write_text('{"completion": "x"}\n{"nope": 1}\n')
    bad = subprocess.run(cmd + ["--input", str(cases)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and f"{cases}:2: each line must be an object with a string 'completion'" in bad.stderr


def test_non_finite_scores_become_zero_with_an_error():
    w = make({"nan": 1.0, "tests.reward_plugins:not_finite": 1.0},
             external={"nan": {"command": [sys.executable, NAN_VERIFIER]}})
    [g] = w.score([group(["nan", "inf", "-inf", "0.5"])])
    assert g.reward_parts["nan"] == [0.0, 0.0, 0.0, 0.5]
    assert g.reward_parts["tests.reward_plugins:not_finite"] == [0.0, 0.0, 0.0, 0.5]
    assert g.rewards == [0.0, 0.0, 0.0, 1.0] and g.reward_stats["errors"] == 6
    assert "non-finite score nan" in g.reward_info["nan"][0]["error"]
    assert "non-finite score" in g.reward_info["tests.reward_plugins:not_finite"][1]["error"]
    w.close()


def test_grpo_verify_prints_finite_scores_for_non_finite_answers(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"completion": c}) + "\n" for c in ["nan", "inf", "-inf", "2"]))
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "verify", "--verifier", "nan", "--input", str(cases),
                           "--external", json.dumps({"nan": {"command": [sys.executable, NAN_VERIFIER]}})],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["score"] for r in rows] == [0.0, 0.0, 0.0, 2.0]
    assert all("non-finite" in r["error"] for r in rows[:3]) and rows[3]["error"] is None


def test_a_timeout_does_not_make_the_next_calls_time_out():
    # the module takes 1.5 s to import; each call has 1 s. The replacement process of a
    # timed-out call starts (and imports) before the next call's deadline begins.
    w = make({"tests.slow_start_plugin:maybe_hang": {"weight": 1.0, "timeout_s": 1.0}}, concurrency=1, cache_size=0)
    [g] = w.score([group(["ok", "hang", "ok", "ok", "hang", "ok"])])
    assert g.rewards == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert g.reward_stats["timeouts"] == 2 and g.reward_stats["errors"] == 0
    w.close()


def test_a_verifier_keyerror_is_reported_as_its_own():
    w = make({"tests.reward_plugins:keyerror": 1.0})
    [g] = w.score([group(["x"])])
    error = g.reward_info["tests.reward_plugins:keyerror"][0]["error"]
    assert "raised KeyError: 'no_such_field'" in error and "unknown verifier" not in error
    w.close()


def test_a_peer_that_stops_reading_cannot_block_a_write():
    # a request far larger than a pipe's buffer, to a program that never reads
    peer = ProcessPeer([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.perf_counter()
    result = peer.call("v", "x" * 4_000_000, {}, timeout_s=1.0)
    assert result["kind"] == "timeout" and time.perf_counter() - t0 < 5
    peer.close()


def test_samples_are_scored_concurrently_within_a_worker():
    w = make({"tests.reward_plugins:napper": {"weight": 1.0, "timeout_s": 10}}, concurrency=4, cache_size=0)
    w.score([group(["warm"] * 4)])
    t0 = time.perf_counter()
    [g] = w.score([group([f"nap {i}" for i in range(8)])])
    assert g.rewards == [1.0] * 8
    assert time.perf_counter() - t0 < 8 * 0.3 / 2  # 8 naps of 0.3 s, 4 at a time: ~0.6 s, never 2.4 s
    w.close()


def test_code_refuses_to_run_unsandboxed_unless_allowed(monkeypatch):
    monkeypatch.setenv("GRPO_CODE_SANDBOX", "none")  # as on a machine without bubblewrap
    answer = code_answer("print('ok')")
    w = make({"code": {"weight": 1.0, "timeout_s": 30}})
    [g] = w.score([group([answer], tests=[{"input": "", "output": "ok"}])])
    assert g.rewards == [0.0] and "allow_unsandboxed_code" in g.reward_info["code"][0]["error"]
    w.close()
    w = make({"code": {"weight": 1.0, "timeout_s": 30}}, allow_unsandboxed_code=True)
    [g] = w.score([group([answer], tests=[{"input": "", "output": "ok"}])])
    assert g.rewards == [1.0] and g.reward_info["code"][0]["sandbox"] == "none"
    w.close()


@pytest.mark.parametrize("mode", ["bwrap", "none"])
def test_code_kills_every_descendant_and_contains_a_fork_bomb(monkeypatch, mode):
    if mode == "none":
        monkeypatch.setenv("GRPO_CODE_SANDBOX", "none")
    marker = f"grpo_marker_{uuid.uuid4().hex}"
    escaped = (f"import os, subprocess, sys\nfor _ in range(3):\n    subprocess.Popen([sys.executable, '-c', "
               f"'import os, time; os.setsid(); time.sleep(300)  # {marker}'], start_new_session=True)\nprint('ok')")
    bomb = f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    w = make({"code": {"weight": 1.0, "timeout_s": 60, "args": {"timeout_s": 3, "cpu_s": 3, "memory_mb": 256}}},
             allow_unsandboxed_code=True, concurrency=1)
    t0 = time.perf_counter()
    [g] = w.score([group([code_answer(escaped), code_answer(bomb)], tests=[{"input": "", "output": "ok"}])])
    assert g.rewards == [1.0, 0.0] and time.perf_counter() - t0 < 30
    time.sleep(0.5)
    assert _leftover_processes(marker) == []  # setsid() children and the bomb's processes: all gone
    w.close()


def test_per_test_limits_fit_inside_the_call_deadline():
    # 6 tests of a correct program that takes 0.5 s each: 3 s in all, inside the 5 s call,
    # although 6 x the per-test limit (3 s) would be 18 s
    slow = code_answer("import time\ntime.sleep(0.5)\nprint(int(input()) * 2)")
    tests = [{"input": str(i), "output": str(2 * i)} for i in range(6)]
    w = make({"code": {"weight": 1.0, "timeout_s": 5.0, "args": {"timeout_s": 3, "cpu_s": 3}}}, concurrency=1)
    [g] = w.score([group([slow], tests=tests)])
    assert g.rewards == [1.0] and g.reward_stats["timeouts"] == 0
    # a program too slow for the call's budget fails its late tests, never the call itself
    slower = code_answer("import time\ntime.sleep(1.2)\nprint(int(input()) * 2)")
    [g] = w.score([group([slower], tests=tests)])
    assert 0.0 < g.rewards[0] < 1.0 and g.reward_stats["timeouts"] == 0
    w.close()
