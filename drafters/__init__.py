"""Drafters distilled from the target: their network, recipe, training data,
the target's responses, training, and the card that describes each. Above
core/ only; the caller hands in the workload rows."""
