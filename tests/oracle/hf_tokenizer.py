"""Oracle (runs under Python 3.11 with transformers): HF tokenizers built from a GGUF or read from a folder.

Reads one JSON request on stdin:
  {"gguf": "/path/model.gguf",     # AutoTokenizer.from_pretrained(folder, gguf_file=name)
   "folder": "/path/hf_folder",    # optional: AutoTokenizer.from_pretrained(folder) as well
   "out": "/tmp/x.npz",
   "texts": ["...", ...],          # -> <tok>_encode_<i>: encode(text) (add_special_tokens default)
   "decode": [[ids], ...],         # -> <tok>_decode_<i> / <tok>_decode_special_<i> (skip / keep specials)
   "chats": [[messages], ...]}     # -> <tok>_chat_<i> (text, add_generation_prompt=True),
                                   #    <tok>_chat_nogen_<i> (False), <tok>_chat_ids_<i> (tokenize=True)
<tok> is `gguf` (transformers' own GGUF conversion), `gguf_isolated_digits` (the same tokenizer
with llama.cpp's split for the `smollm` family -- every \\p{N} isolated, then the byte-level
GPT-2 split -- which transformers' GGUF table does not list; requested with
"isolate_digits": true) and `folder`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import transformers
from tokenizers import Regex, pre_tokenizers


def run(tok, prefix: str, req: dict, out: dict) -> None:
    for i, text in enumerate(req.get("texts", [])):
        out[f"{prefix}_encode_{i}"] = np.asarray(tok.encode(text), dtype=np.int64)
    for i, ids in enumerate(req.get("decode", [])):
        out[f"{prefix}_decode_{i}"] = np.asarray(tok.decode(ids, skip_special_tokens=True))
        out[f"{prefix}_decode_special_{i}"] = np.asarray(tok.decode(ids, skip_special_tokens=False))
    for i, messages in enumerate(req.get("chats", [])):
        out[f"{prefix}_chat_{i}"] = np.asarray(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        out[f"{prefix}_chat_nogen_{i}"] = np.asarray(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        out[f"{prefix}_chat_ids_{i}"] = np.asarray(ids, dtype=np.int64)


def main() -> None:
    req = json.load(sys.stdin)
    path = Path(req["gguf"])
    out = {}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    run(tok, "gguf", req, out)
    if req.get("isolate_digits"):
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        run(tok, "gguf_isolated_digits", req, out)
    if req.get("folder"):
        run(transformers.AutoTokenizer.from_pretrained(req["folder"]), "folder", req, out)
    np.savez(req["out"], **out)


if __name__ == "__main__":
    main()
