"""Anchor reward service and pure reward functions of Refine-RL (issue #5)."""
