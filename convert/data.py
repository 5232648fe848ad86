"""Training / calibration text: read txt or jsonl, split train / held-out, tokenize, pack into blocks.

Shared by ProSparse training, `hybrid-convert eval`, the profiler and the demo-model trainer,
so every stage measures on the same text.

Split convention: the last 5% of each file (by characters) is held out. The cut is moved
forward to just after the next newline so no line is split (if the text has none there, the
cut is exact). In a jsonl file the same character position is taken over the concatenated
`text` fields: whole records after it are held out, the record it falls in is cut at a newline.

Packing: each document (a whole txt file, or one jsonl record) is tokenized without special
tokens, preceded by the tokenizer's BOS and followed by its EOS where it has them (a piece of a
document cut by the split gets BOS only where the document starts, EOS only where it ends);
all files' tokens are concatenated in the order given and cut into `block_len` blocks, the
remainder dropped. Long texts are tokenized in ~64 KiB chunks cut after a newline (batched
through the fast tokenizer); tokenizers that add a prefix space to every call (LLaMA's
SentencePiece) therefore see one extra space at the start of each chunk, ~1 token in 16K.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hybrid_runtime.errors import UserError

HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout", "all")
_CHUNK_CHARS = 1 << 16
_ENCODE_BATCH = 64


@dataclass
class TextPiece:
    """A stretch of one document: which side of the split, and whether the document starts/ends here."""
    text: str
    starts_doc: bool
    ends_doc: bool


def read_documents(path: str | Path) -> list[str]:
    """The documents of a .txt file (the whole file) or a .jsonl file (each record's `text`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not valid UTF-8 (bad byte at offset {e.start})") from None
    if p.suffix.lower() == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f"{p}:{lineno}: expected an object with a string field 'text'")
            docs.append(rec["text"])
        if not any(d.strip() for d in docs):
            raise UserError(f"{p}: no text (empty file or only empty 'text' fields)")
        return docs
    if not text.strip():
        raise UserError(f"{p}: empty file (no text)")
    return [text]


def split_documents(docs: Sequence[str], split: str,
                    heldout_fraction: float = HELDOUT_FRACTION) -> list[TextPiece]:
    """The pieces of `docs` on one side of the split ('train', 'heldout' or 'all')."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    if split == "all":
        return [TextPiece(d, True, True) for d in docs]
    total = sum(len(d) for d in docs)
    cut = math.ceil(total * (1.0 - heldout_fraction))  # character position in the concatenation
    pieces: list[TextPiece] = []
    start = 0
    for d in docs:
        end = start + len(d)
        if end <= cut:      # wholly train
            if split == "train":
                pieces.append(TextPiece(d, True, True))
        elif start >= cut:  # wholly held out
            if split == "heldout":
                pieces.append(TextPiece(d, True, True))
        else:               # the split falls in this document: cut after the next newline
            local = cut - start
            nl = d.find("\n", local)
            local = nl + 1 if nl >= 0 else local
            if split == "train":
                pieces.append(TextPiece(d[:local], True, local >= len(d)))
            elif local < len(d):
                pieces.append(TextPiece(d[local:], local == 0, True))
        start = end
    return [p for p in pieces if p.text]


def iter_split_text(files: Sequence[str | Path], split: str) -> Iterator[str]:
    """Text of one split of all files, in ~64 KiB chunks (for training a tokenizer)."""
    for f in files:
        for piece in split_documents(read_documents(f), split):
            yield from _chunks(piece.text)


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """`text` in pieces of about `size` characters, each cut just after a newline when there is one."""
    out, i = [], 0
    while i < len(text):
        j = min(i + size, len(text))
        if j < len(text):
            nl = text.find("\n", j)
            j = nl + 1 if 0 <= nl < j + size else j
        out.append(text[i:j])
        i = j
    return out


def _encode_piece(piece: TextPiece, tokenizer, budget: int | None) -> list[int]:
    """Token ids of one piece (+BOS/EOS), stopping once `budget` tokens are reached."""
    ids: list[int] = []
    if piece.starts_doc and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    chunks = _chunks(piece.text)
    for b in range(0, len(chunks), _ENCODE_BATCH):
        if budget is not None and len(ids) >= budget:
            return ids[:budget]
        enc = tokenizer(chunks[b:b + _ENCODE_BATCH], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
    if piece.ends_doc and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids if budget is None else ids[:budget]


def load_token_blocks(files: Sequence[str | Path], tokenizer, block_len: int, split: str = "train",
                      max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize one split of `files` and pack it into blocks: (N, block_len) int64.

    `max_tokens` caps the tokens used, spread evenly over the files (a file with fewer leaves
    its share to the next ones); only what is needed is tokenized.
    """
    if not files:
        raise UserError("no data files given")
    if block_len < 2:
        raise UserError(f"block length must be >= 2 (got {block_len})")
    if max_tokens is not None and max_tokens < block_len:
        raise UserError(f"{max_tokens} tokens requested: less than one block of {block_len} tokens")
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    streams: list[list[int]] = []
    remaining = max_tokens
    for k, f in enumerate(files):
        budget = None if remaining is None else math.ceil(remaining / (len(files) - k))
        ids: list[int] = []
        for piece in split_documents(read_documents(f), split):
            ids.extend(_encode_piece(piece, tokenizer, None if budget is None else budget - len(ids)))
            if budget is not None and len(ids) >= budget:
                break
        streams.append(ids)
        if remaining is not None:
            remaining -= len(ids)
    tokens = torch.tensor([t for s in streams for t in s], dtype=torch.int64)
    n_blocks = tokens.numel() // block_len
    if max_tokens is not None:
        n_blocks = min(n_blocks, max_tokens // block_len)
    if n_blocks == 0:
        names = ", ".join(str(f) for f in files)
        raise UserError(f"{names}: the {split} split has {tokens.numel()} tokens, fewer than one block "
                        f"of {block_len} (give more text or a smaller --block-len)")
    return tokens[: n_blocks * block_len].view(n_blocks, block_len)


def train_bpe_tokenizer(files: Sequence[str | Path], vocab_size: int, split: str = "train"):
    """A byte-level BPE tokenizer trained on one split of `files` (train: no held-out leakage).

    Special tokens: <s> (BOS), </s> (EOS), <pad>. Returns a transformers fast tokenizer; save
    it beside the model with `.save_pretrained(dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    min_vocab = 256 + len(specials)
    if vocab_size < min_vocab:
        raise UserError(f"byte-level BPE needs a vocabulary of at least {min_vocab} (got {vocab_size})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_split_text(files, split), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
