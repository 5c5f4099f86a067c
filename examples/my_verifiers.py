"""Example plug-in verifiers, named in a config by import path, e.g.
    rewards.verifiers: {"examples.my_verifiers:keyword": {weight: 0.5, args: {word: "because"}}}
"""
from rewards.api import Score


def keyword(completion: str, fields: dict, word: str = "therefore") -> Score:
    """1 when the completion uses `word`, with where it was found."""
    at = completion.find(word)
    return Score(float(at >= 0), {"position": at})


class ShortAnswer:
    """A class plug-in: instantiated once, then called per sample."""

    def __init__(self) -> None:
        self.limit = 20

    def __call__(self, completion: str, fields: dict) -> float:
        return 1.0 if len(completion) <= self.limit else 0.0
