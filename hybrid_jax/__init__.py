"""hybrid_jax: hybrid state-space + attention language models (Mamba, Mamba-2, Samba, Taipan) in JAX/Flax."""
