"""Hydra config tree of apex_jax, installed as the package ``apex_jax.conf``."""
