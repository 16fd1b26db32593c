"""hybrid_jax.data."""
