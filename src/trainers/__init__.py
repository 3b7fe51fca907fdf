"""Trainer variants (transformers.Trainer subclasses) and their glue: encoding, collators, rollouts, metrics."""
