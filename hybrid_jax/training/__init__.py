"""hybrid_jax.training."""
