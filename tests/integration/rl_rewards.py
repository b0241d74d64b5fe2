"""Reward functions for the RL end-to-end tests (importable by path from a recipe)."""

from __future__ import annotations

from posttrain.rewards import sample_reward


@sample_reward
def length_reward(sample) -> float:
    """Dense, always-defined reward so a random tiny model gets a learning signal."""
    return min(len(sample.completion), 6) / 6.0


@sample_reward
def flaky_reward(sample) -> float:
    """Raises on prompts whose answer ends in 3 and returns NaN on those ending in 7."""
    answer = str(sample.fields["answer"])
    if answer.endswith("3"):
        raise RuntimeError("deliberate failure")
    if answer.endswith("7"):
        return float("nan")
    return 1.0


@sample_reward
def flat_on_even_answers(sample) -> float:
    """The same reward for every sample of a prompt whose answer is even (DAPO filters those
    groups), the length reward otherwise."""
    if int(sample.fields["answer"]) % 2 == 0:
        return 0.5
    return min(len(sample.completion), 6) / 6.0
