"""Rollouts: generation engines, where a step's responses come from, weight sync to copies and
rollout ranks."""
