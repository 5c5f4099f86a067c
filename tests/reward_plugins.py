"""Misbehaving verifiers for the reward-worker tests (named by import path)."""
import os
import time


def crash(completion: str, fields: dict) -> float:
    if "crash" in completion:
        os._exit(3)
    return 1.0


def raises(completion: str, fields: dict) -> float:
    if "raise" in completion:
        raise RuntimeError("verifier bug")
    return 1.0


def sleepy(completion: str, fields: dict) -> float:
    if "sleep" in completion:
        time.sleep(60)
    return 1.0


def chatty(completion: str, fields: dict) -> float:
    print("verifiers that print must not corrupt the protocol")
    return 0.5


def keyerror(completion: str, fields: dict) -> float:
    return float(fields["no_such_field"])  # a bug in the verifier: a KeyError of its own


def not_finite(completion: str, fields: dict) -> float:
    return float(completion)  # "nan", "inf", "-inf" parse to non-finite floats


def napper(completion: str, fields: dict) -> float:
    if completion.startswith("nap"):
        time.sleep(0.3)
    return 1.0
