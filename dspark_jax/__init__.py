"""dspark_jax: DSpark speculative decoding in JAX."""
