"""Sampling seeds: one independent stream per sample, derived by hashing.

vLLM seeds each request's sampler with its own generator, so two requests with the
same seed draw the same stream. Seeds that are small offsets of one base (prompt i
gets base + i, its samples base + i + k) make streams repeat across prompts and
steps; hashing (run seed, purpose, the prompt's place in the run, sample index)
gives each sample its own stream, reproducibly."""
from __future__ import annotations

import hashlib

SEED_BITS = 63


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from a tuple of ints/strings (blake2b of their repr)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def sample_seeds(run_seed: int, purpose: str, key: int, n: int) -> list[int]:
    """The seeds of a prompt's n samples. `key` is the prompt's position in the run's
    stream for training (unique per draw: it fixes the step and sampling round)."""
    return [derive_seed(run_seed, purpose, key, k) for k in range(n)]
