"""Model definitions used by the built-in tasks (plain `torch.nn` modules, no task logic)."""
