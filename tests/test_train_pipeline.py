"""The recipe end to end through the command-line entry points, on a tiny real GGUF model:
regenerate answers (resumable) → tokenize with the chat template → train → export → fit STS on
the held-out prompts → evaluate (JSON + reliability PNG)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthetic_gguf import tiny_gguf
from dspark_jax.loading import load_tokenizer
from dspark_jax.train.data import conversation_tokens

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

PROMPTS = [["def add(a, b):"], ["The quick brown fox", "and the lazy dog?"], ["In 2024 there were"],
           ["print(add(12, 345))"], ["naïve café"], ["for i in range(100):"], ["It's 42 o'clock!"],
           ["total += i * 7", "# sum"]]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path, _ = tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", chat_template=CHATML, layers=3,
                        context=512)
    return path


def test_loss_mask_covers_assistant_turns_and_their_end(gguf):
    tok = load_tokenizer(gguf)
    messages = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"},
                {"role": "user", "content": "and 12?"}, {"role": "assistant", "content": "print(add(12, 345))"}]
    ids, mask = conversation_tokens(tok, messages)
    assert ids.tolist() == tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    supervised = [tok.decode(ids[mask][i:j], skip_special_tokens=False) for i, j in _runs(mask)]
    assert supervised == ["return a + b<|im_end|>\n", "print(add(12, 345))<|im_end|>\n"]


def _runs(mask):
    """(start, end) in mask[mask]-coordinates of each contiguous run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    lengths = edges[1::2] - edges[::2]
    ends = np.cumsum(lengths)
    return list(zip(ends - lengths, ends))


def test_recipe_end_to_end(tmp_path, gguf, monkeypatch):
    from dspark_jax import eval as evaluation
    from dspark_jax.train import __main__ as train_cli
    from dspark_jax.train import calibrate, regenerate

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts" / "tiny.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("".join(json.dumps({"turns": t}) + "\n" for t in PROMPTS))
    answers, run = tmp_path / "answers", tmp_path / "run"
    vocab = load_tokenizer(gguf).vocab_size
    config = tmp_path / "tiny_train.py"
    config.write_text(f"""
from dspark_jax.config import Config, DraftConfig, ServeConfig, TargetConfig, TrainConfig
config = Config(
    target=TargetConfig(source={str(gguf)!r}, dtype="float32"),
    draft=DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0, 1), mask_token_id={vocab - 1},
                      markov_rank=16, block_size=3),
    serve=ServeConfig(max_batch=4),
    train=TrainConfig(data=({str(answers)!r},), out_dir={str(run)!r}, steps=3, batch_size=2, max_length=128,
                      min_length=128, anchors_per_sequence=8, compute_dtype="float32", checkpoint_every=2,
                      log_every=1, min_loss_tokens=4, holdout_fraction=0.25),
)
""")
    common = ["--config", str(config)]
    regen = common + ["--prompts", str(prompts.parent), "--out", str(answers), "--max-new-tokens", "20",
                      "--batch", "4"]
    assert regenerate.main(regen + ["--time-limit", "0"]) == 0  # stops after the first batch
    assert sorted(p.name for p in answers.iterdir()) == ["part-00000.jsonl", "settings.json"]
    assert regenerate.main(regen) == 0  # resumes with the second
    records = [json.loads(line) for p in sorted(answers.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    assert sorted((r["source"], r["index"]) for r in records) == [("tiny", i) for i in range(8)]
    two_turns = next(r for r in records if r["index"] == 1)["messages"]
    assert [m["role"] for m in two_turns] == ["user", "assistant", "user", "assistant"]
    assert regenerate.main(regen[:-1] + ["8"]) == 2  # other settings into the same folder are refused

    assert train_cli.main(common + ["--no-progress"]) == 0
    assert (run / "draft" / "config.json").is_file() and (run / "draft" / "sts.json").is_file()
    heldout = (run / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(heldout) == 2 and all(json.loads(line)["turns"][0] in sum(PROMPTS, []) for line in heldout)

    assert calibrate.main(common + ["--draft", str(run / "draft"), "--prompts", str(run / "heldout_prompts.jsonl"),
                                    "--max-new-tokens", "16"]) == 0
    sts = json.loads((run / "draft" / "sts.json").read_text())
    assert len(sts["temperatures"]) == 3 and sts["rounds"] > 0 and sts["ece_after"] <= sts["ece_before"] + 1e-12
    assert train_cli.main(common + ["--no-progress"]) == 0  # rerun after the end: nothing to do
    assert json.loads((run / "draft" / "sts.json").read_text()) == sts  # the fitted temperatures stay

    out = tmp_path / "result.json"
    assert evaluation.main(common + ["--draft", str(run / "draft"), "--prompts", str(prompts), "--limit", "3",
                                     "--max-new-tokens", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    tiny = result["datasets"]["tiny"]
    assert tiny["prompts"] == 3 and tiny["rounds"] > 0 and 1.0 <= tiny["tau"] <= 4.0
    assert len(tiny["accept_cond"]) == 3 and len(tiny["survival"]) == 3
    assert tiny["calibration"]["after_sts"]["temperatures"] == pytest.approx(sts["temperatures"])
    assert (tmp_path / "result.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun with one more prompt set evaluates only that one and keeps the finished set
    more = tmp_path / "prompts" / "more.jsonl"
    more.write_text(json.dumps({"turns": ["def add(a, b):"]}) + "\n")
    calls = []
    rollout = evaluation.rollout
    monkeypatch.setattr(evaluation, "rollout", lambda *a, **k: calls.append(len(a[2])) or rollout(*a, **k))
    assert evaluation.main(common + ["--draft", str(run / "draft"), "--prompts", str(prompts), "--prompts", str(more),
                                     "--limit", "3", "--max-new-tokens", "16", "--out", str(out)]) == 0
    rerun = json.loads(out.read_text())
    assert calls == [1] and rerun["datasets"]["tiny"] == tiny and rerun["datasets"]["more"]["prompts"] == 1


def test_plain_text_becomes_fully_supervised_windows(tmp_path, gguf):
    from dspark_jax.config import TrainConfig
    from dspark_jax.train.data import DataError, text_windows, tokenize

    tok = load_tokenizer(gguf)
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    texts = {"a.py": "def add(a, b):\n    return a + b\n" * 30, "pkg/b.py": "print(add(12, 345))\n" * 20}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    expected = [tok.encode(texts[name], add_special_tokens=False) for name in sorted(texts)]
    windows = text_windows(tok, [str(corpus / "**" / "*.py")], max_length=64, min_tokens=4, max_tokens=0)
    assert np.concatenate(windows).tolist() == sum(expected, [])  # every token once, files in sorted order
    assert all(len(w) <= 64 for w in windows)
    capped = text_windows(tok, [str(corpus / "**" / "*.py")], max_length=64, min_tokens=4, max_tokens=100)
    assert sum(map(len, capped)) == 100
    data = tokenize(TrainConfig(text_data=(str(corpus / "*.py"),), max_length=64, min_length=16, min_loss_tokens=4),
                    tok)
    assert all(m.all() for m in data.masks) and np.concatenate(data.ids).tolist() == expected[0]
    with pytest.raises(DataError, match="matches no files"):
        text_windows(tok, [str(corpus / "*.txt")], max_length=64, min_tokens=4, max_tokens=0)
