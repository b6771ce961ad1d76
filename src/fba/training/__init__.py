"""Epoch loop, run folders, checkpoints and logs around the learner's local step."""
