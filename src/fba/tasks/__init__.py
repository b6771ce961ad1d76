"""Tasks: models as units + head, losses, data and metrics for each vision task."""
