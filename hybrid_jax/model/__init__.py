"""hybrid_jax.model."""
