"""Training data: conversations and plain text → token ids + loss masks → length-bucketed batches.

Conversations are JSONL records `{"messages": [{"role": ..., "content": ...}, ...]}` (what
`dspark_jax.train.regenerate` writes). Each is rendered with the tokenizer's chat template and
tokenized once; the loss mask covers every assistant turn's content and its end-of-turn text,
located by rendering the conversation up to each turn (with and without the answer) and mapping
character spans to tokens through the tokenizer's offsets. Plain-text files (`text_data` globs)
are cut into windows of `max_length` tokens, every token supervised.

A fraction of the conversations (seeded) is held out for STS calibration; their user turns are
written as a prompts file. Batches come from length buckets (powers of two from `min_length`, up
to `max_length`) so a step compiles once per bucket and short answers are not padded to the
longest; the order of epoch e depends only on (seed, e), so step i always sees the same batch.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from dspark_jax.config import TrainConfig
from dspark_jax.eval import atomic_write_text, jsonl_files, read_jsonl


class DataError(ValueError):
    """Training data that cannot be used as given."""


# --------------------------------------------------------------------------------------------
# tokenization


def conversation_tokens(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, loss mask [n] bool) of a rendered conversation; the mask covers assistant turns."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("a conversation without an assistant turn has nothing to learn from")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the chat template renders a conversation's prefix differently from the whole "
                            "conversation; assistant spans cannot be located")
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = np.asarray([start for start, _ in encoding.offsets], np.int64)
    mask = np.zeros(len(starts), bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return np.asarray(encoding.ids, np.int32), mask


def text_windows(tokenizer, patterns, *, max_length: int, min_tokens: int, max_tokens: int):
    """Plain-text files matching the glob patterns (sorted), cut into windows of max_length tokens."""
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
    if patterns and not files:
        raise DataError(f"TrainConfig.text_data {list(patterns)} matches no files")
    windows, total = [], 0
    for name in files:
        ids = np.asarray(tokenizer.encode(Path(name).read_text(errors="replace"), add_special_tokens=False), np.int32)
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            if max_tokens and total + len(piece) > max_tokens:
                piece = piece[:max_tokens - total]
            if len(piece) >= min_tokens:
                windows.append(piece)
                total += len(piece)
            if max_tokens and total >= max_tokens:
                return windows
    return windows


@dataclasses.dataclass
class TokenizedData:
    """Training sequences (ids, loss mask) and the held-out conversations' user turns."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    heldout: list[list[str]]  # user turns of the held-out conversations

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids], np.int64)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, ids=np.concatenate(self.ids), masks=np.concatenate(self.masks),
                 lengths=self.lengths, heldout=np.asarray(json.dumps(self.heldout)))
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> "TokenizedData":
        with np.load(path) as f:
            cuts = np.cumsum(f["lengths"])[:-1]
            return TokenizedData(ids=np.split(f["ids"], cuts), masks=np.split(f["masks"].astype(bool), cuts),
                                 heldout=json.loads(str(f["heldout"])))


def _fingerprint(cfg: TrainConfig, tokenizer_source: str, files, text_patterns) -> str:
    h = hashlib.sha256()
    fields = dict(max_length=cfg.max_length, min_loss_tokens=cfg.min_loss_tokens, text=list(text_patterns),
                  text_max_tokens=cfg.text_max_tokens, holdout=cfg.holdout_fraction, seed=cfg.seed,
                  tokenizer=tokenizer_source)
    h.update(json.dumps(fields, sort_keys=True).encode())
    for f in files:
        stat = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenize(cfg: TrainConfig, tokenizer) -> TokenizedData:
    """Tokenize `cfg.data` conversations and `cfg.text_data` windows (see the module doc)."""
    conversations = []
    for path in jsonl_files(cfg.data):
        for number, record in enumerate(read_jsonl(path), 1):
            if not isinstance(record.get("messages"), list):
                raise DataError(f"{path}:{number}: expected a record with \"messages\" (a regenerated conversation)")
            conversations.append(record["messages"])
    rng = np.random.default_rng([cfg.seed, 7])
    held = set(rng.permutation(len(conversations))[:int(round(cfg.holdout_fraction * len(conversations)))].tolist())
    ids, masks, heldout = [], [], []
    for i, messages in enumerate(conversations):
        if i in held:
            heldout.append([m["content"] for m in messages if m.get("role") == "user"])
            continue
        seq, mask = conversation_tokens(tokenizer, messages)
        seq, mask = seq[:cfg.max_length], mask[:cfg.max_length]
        if mask.sum() >= cfg.min_loss_tokens:
            ids.append(seq)
            masks.append(mask)
    for window in text_windows(tokenizer, cfg.text_data, max_length=cfg.max_length, min_tokens=cfg.min_loss_tokens,
                               max_tokens=cfg.text_max_tokens):
        ids.append(window)
        masks.append(np.ones(len(window), bool))
    if not ids:
        raise DataError("no training sequences: set train.data (regenerated conversations) or train.text_data")
    return TokenizedData(ids, masks, heldout)


def prepare(cfg: TrainConfig, tokenizer, out_dir: Path) -> TokenizedData:
    """Tokenized data, cached in out_dir by a fingerprint of its inputs; writes heldout_prompts.jsonl."""
    files = jsonl_files(cfg.data)
    cache = out_dir / f"data-{_fingerprint(cfg, tokenizer.source, files, cfg.text_data)}.npz"
    if cache.is_file():
        data = TokenizedData.load(cache)
    else:
        data = tokenize(cfg, tokenizer)
        data.save(cache)
    atomic_write_text(out_dir / "heldout_prompts.jsonl", "".join(json.dumps({"turns": t}) + "\n" for t in data.heldout))
    return data


# --------------------------------------------------------------------------------------------
# batches


def bucket_length(length: int, cfg: TrainConfig) -> int:
    size = cfg.min_length
    while size < length:
        size *= 2
    return min(size, cfg.max_length)


class Batches:
    """Deterministic length-bucketed batches: `batch(step)` → (tokens, loss_mask) [grad_accum, batch_size, S]."""

    def __init__(self, data: TokenizedData, cfg: TrainConfig):
        self.data, self.cfg = data, cfg
        self.group = cfg.batch_size * cfg.grad_accum
        self.buckets = np.asarray([bucket_length(n, cfg) for n in data.lengths])
        sizes = np.unique(self.buckets, return_counts=True)
        self.steps_per_epoch = int(sum(-(-count // self.group) for count in sizes[1]))
        self._epoch, self._plan = None, None

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(sequence length, sample indices; −1 = empty row) of every batch of an epoch, in order."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(len(self.buckets))
        batches = []
        for size in np.unique(self.buckets):
            members = order[self.buckets[order] == size]
            for start in range(0, len(members), self.group):
                chunk = members[start:start + self.group]
                batches.append((int(size), np.pad(chunk, (0, self.group - len(chunk)), constant_values=-1)))
        return [batches[i] for i in rng.permutation(len(batches))]

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._epoch_plan(epoch)
        return self._plan[index]

    def tokens(self, step: int) -> int:
        """Real (unpadded) tokens in step's batch."""
        length, members = self.indices(step)
        return int(np.minimum(self.data.lengths[members[members >= 0]], length).sum())

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        length, members = self.indices(step)
        tokens = np.zeros((self.group, length), np.int32)
        mask = np.zeros((self.group, length), bool)
        for row, i in enumerate(members):
            if i >= 0:
                n = min(len(self.data.ids[i]), length)
                tokens[row, :n] = self.data.ids[i][:n]
                mask[row, :n] = self.data.masks[i][:n]
        shape = (self.cfg.grad_accum, self.cfg.batch_size, length)
        return tokens.reshape(shape), mask.reshape(shape)
