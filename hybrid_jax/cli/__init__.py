"""hybrid_jax.cli."""
