"""hybrid_jax.inference."""
