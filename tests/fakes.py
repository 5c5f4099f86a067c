"""Fakes of our own small interfaces, in a module that imports nothing heavy (Ray
actors made from these classes import it in their own processes)."""
import threading

from rollout.types import Group, Sample


class FakeGenerator:
    """Answers "solvable-K" prompts correctly in every sample and "mixed-K" in half;
    each prompt takes `delay` seconds, its samples stamped with the version held when
    it finishes (as partial rollouts would) and the version it started under."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.version = delay, 0
        self.lock = threading.Condition()
        self.done: list[Group] = []
        self.started: dict[int, int] = {}  # key -> version when submitted

    def set_version(self, v: int) -> None:
        with self.lock:
            self.version = v

    def submit(self, jobs):
        for key, row, seeds in jobs:
            with self.lock:
                self.started[key] = self.version
            threading.Timer(self.delay, self._finish, (key, row, seeds)).start()
        return len(jobs)

    def _finish(self, key, row, seeds):
        texts = ["<answer>1</answer>"] * len(seeds) if row["prompt"].startswith("solvable") else \
            ["<answer>1</answer>", "<answer>0</answer>"] * (len(seeds) // 2)
        with self.lock:
            start = self.started[key]
            versions = [(start, 0)] if start == self.version else [(start, 0), (self.version, 1)]
            samples = [Sample([1, 2], [-0.5, -0.5], t, "stop", versions, s) for t, s in zip(texts, seeds)]
            self.done.append(Group([1], row["prompt"], row, samples, key=key))
            self.lock.notify_all()

    def collect(self, timeout_s=1.0):
        with self.lock:
            self.lock.wait_for(lambda: self.done, timeout=timeout_s)
            out, self.done = self.done, []
            return out

    def abort_all(self):
        return 0

    def started_versions(self):
        return dict(self.started)


class SlowStartGenerator:
    """A generator whose start (ready) takes `start_s` seconds; it answers health probes."""

    def __init__(self, start_s: float = 60.0):
        self.start_s = start_s

    def ready(self):
        import time
        time.sleep(self.start_s)
        return {}

    def health(self):
        return {"load": 0, "updating": False, "seconds_since_step": 0.0}


class SleepyGenerator(SlowStartGenerator):
    """A generator with vLLM's sleep mode (colocated on GPUs): `sleep` counts, or fails."""

    def __init__(self, broken: bool = False):
        super().__init__(0.0)
        self.broken, self.slept = broken, 0

    def sleep(self):
        if self.broken:
            raise RuntimeError("sleep mode failed")
        self.slept += 1
        return True

    def times_slept(self):
        return self.slept
