"""Training-run machinery shared by the launch scripts: checkpoints, metrics sink, the loop."""
