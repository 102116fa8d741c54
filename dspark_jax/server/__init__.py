"""The OpenAI-compatible HTTP server: `python -m dspark_jax.serve --config NAME.py` starts it."""

from dspark_jax.server.app import ServedModel, create_app
from dspark_jax.server.runner import run_server

__all__ = ["ServedModel", "create_app", "run_server"]
