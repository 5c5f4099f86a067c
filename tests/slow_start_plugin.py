"""A verifier whose module takes 1.5 s to import (as math-verify or sympy can): a
replacement verifier process must start outside the call's deadline."""
import time

time.sleep(1.5)


def maybe_hang(completion: str, fields: dict) -> float:
    if "hang" in completion:
        time.sleep(60)
    return 1.0
