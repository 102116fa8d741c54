"""Draft training: data (regenerated conversations, text), losses, the Optax step, the loop.

`python -m dspark_jax.train --config NAME.py` trains the config's draft against its frozen
target; `dspark_jax.train.regenerate` makes the data, `dspark_jax.train.calibrate` fits STS.
"""
