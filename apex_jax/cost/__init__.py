"""Operator and plan cost models: per-kernel times (:mod:`~apex_jax.cost.kernels`) and the
measured tables (:mod:`~apex_jax.cost.tables`) price what a plan's layout does
(:mod:`~apex_jax.cost.parallel`) as per-iteration time (:mod:`~apex_jax.cost.iteration`) and
energy (:mod:`~apex_jax.cost.energy`) constants, which the engine consumes."""

__all__: list[str] = []
