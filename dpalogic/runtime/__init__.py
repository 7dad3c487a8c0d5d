"""Runtime: the torch modules that run compiled losses, the fused LM-head path, the backend rule."""
