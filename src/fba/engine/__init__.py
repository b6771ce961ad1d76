"""Task-agnostic local-learning engine: partition, learner (the local step), bank, fusion."""
