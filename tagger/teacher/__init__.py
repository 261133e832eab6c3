"""The pretrained teacher (musicnn) and the bridge from our representation to its input."""
