"""What is on disk: checkpoints, exported folders, released formats, run folders."""
