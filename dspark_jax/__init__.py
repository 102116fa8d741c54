"""dspark_jax: DSpark speculative decoding (parallel draft + Markov head + confidence scheduling) in JAX.

    import dspark_jax as dj
    target = dj.load_target("smollm2-135m-instruct", dtype="float32")
    draft = dj.load_draft("ngram", target=target)
    res = dj.generate(target, draft, [[1, 2, 3]], max_new_tokens=64, spec=dj.SpecParams(block_size=5))
"""

from dspark_jax import speculative as spec  # public name (dj.spec.verify, ...); also dj.speculative
from dspark_jax.config import Config, load_config
from dspark_jax.loading import load_draft, load_target, load_tokenizer
from dspark_jax.models import forward
from dspark_jax.speculative.decode import GenerateResult, SpecStats
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams

__all__ = ["Config", "GenerateResult", "SamplingParams", "SpecParams", "SpecStats", "forward", "generate",
           "load_config", "load_draft", "load_target", "load_tokenizer", "spec"]
