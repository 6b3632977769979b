"""Token data for every stage: toy tasks and real text, tokenised and packed to a context length.

A `DataSpec` names where tokens come from; a model dir records the spec it was trained on
(`data.json`), so later stages use the model's own data unless told otherwise.
Text goes through `datasets` (local text/JSONL/JSON/parquet files; hub names where a network
exists). `stdlib` names a corpus on every machine: the Python standard library's own source.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import MissingInputError, StageError
from ..io import read_json, write_json

log = logging.getLogger(__name__)

DATA_FILE = "data.json"
STDLIB = "stdlib"
_EXCLUDED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
_LOADERS = {
    ".txt": "text",
    ".py": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


class DataSpec(BaseModel):
    """Where a stage's tokens come from."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["addition"] | None = Field(None, description="A toy task instead of a corpus.")
    corpus: list[str] | None = Field(
        None,
        description="Text files, folders, globs, a hub dataset name, or 'stdlib' (the Python standard library's source).",
    )
    text_field: str = Field("text", description="Column holding the text in JSON/parquet data.")
    context_length: int | None = Field(None, gt=1, description="Tokens per packed sequence.")
    heldout_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of sequences held out for evaluation."
    )
    max_tokens: int | None = Field(None, gt=0, description="Use at most this many corpus tokens.")
    seed: int = 0


@dataclass
class TokenData:
    """Packed sequences as model inputs and next-token targets (-100 where no loss is taken)."""

    train_inputs: torch.Tensor  # N,T
    train_targets: torch.Tensor  # N,T
    heldout_inputs: torch.Tensor
    heldout_targets: torch.Tensor
    tokenizer: Tokenizer
    spec: DataSpec

    @property
    def context_length(self) -> int:
        return self.train_inputs.shape[1]

    def batch(self, step: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of `step`: a pure function of (seed, step), so resuming replays nothing."""
        n = self.train_inputs.shape[0]
        per_epoch = max(n // batch_size, 1)
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[i * batch_size : (i + 1) * batch_size]
        return self.train_inputs[idx], self.train_targets[idx]


# ----------------------------------------------------------------------------- text


def stdlib_source_files() -> list[Path]:
    """The standard library's .py files (tests left out), found through sysconfig."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _EXCLUDED_STDLIB_DIRS & set(p.relative_to(root).parts)
    )
    if not files:
        raise MissingInputError(f"no Python source files under the standard library folder {root}")
    return files


def _expand(corpus: list[str]) -> list[Path] | str:
    """Local files for the corpus entries, or the single hub dataset name when nothing is local."""
    files: list[Path] = []
    for entry in corpus:
        if entry == STDLIB:
            files += stdlib_source_files()
            continue
        path = Path(entry)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _LOADERS)
        elif path.is_file():
            files.append(path)
        elif any(ch in entry for ch in "*?["):
            files += (
                sorted(Path().glob(entry))
                if not path.is_absolute()
                else sorted(Path("/").glob(entry[1:]))
            )
        elif len(corpus) == 1 and "/" in entry and not entry.startswith((".", "/")):
            return entry  # a hub dataset name such as "user/name"
        else:
            raise MissingInputError(
                f"corpus entry {entry!r} is neither a file, a folder, a glob nor 'stdlib'"
            )
    if not files:
        raise StageError(f"corpus {corpus} holds no readable files (looked for {sorted(_LOADERS)})")
    return files


def load_texts(corpus: list[str], text_field: str = "text") -> list[str]:
    """Documents of a corpus, through `datasets`. Plain-text files count as one document each."""
    import datasets  # noqa: PLC0415  (heavy; only text stages need it)

    datasets.disable_progress_bars()
    source = _expand(corpus)
    if isinstance(source, str):
        ds = datasets.load_dataset(source, split="train")
        texts = list(ds[text_field])
    else:
        texts = []
        by_loader: dict[str, list[str]] = {}
        for f in source:
            loader = _LOADERS.get(f.suffix, "text")
            by_loader.setdefault(loader, []).append(str(f))
        for loader, paths in by_loader.items():
            if loader == "text":
                ds = datasets.load_dataset(
                    "text", data_files=paths, split="train", sample_by="document"
                )
                texts += ds["text"]
            else:
                ds = datasets.load_dataset(loader, data_files=paths, split="train")
                if text_field not in ds.column_names:
                    raise StageError(
                        f"{paths[0]}: no column {text_field!r} (columns: {ds.column_names})"
                    )
                texts += ds[text_field]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise StageError(f"corpus {corpus} is empty: no non-blank document")
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 4096) -> Tokenizer:
    """A byte-level BPE tokenizer with <|endoftext|> (id 0) between documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pack(
    texts: list[str], tokenizer: Tokenizer, context_length: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Concatenate documents (each followed by the separator) and cut into [N, context_length + 1]."""
    sep = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids += enc.ids
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // (context_length + 1)
    if n == 0:
        raise StageError(
            f"corpus has {len(ids)} tokens, fewer than one sequence of context length {context_length} + 1"
        )
    return torch.tensor(np.asarray(ids[: n * (context_length + 1)], dtype=np.int64)).view(
        n, context_length + 1
    )


def split_heldout(
    seqs: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(round(fraction * seqs.shape[0])))
    if n_held >= seqs.shape[0]:
        raise StageError(
            f"only {seqs.shape[0]} sequences: too few to hold {fraction:.0%} out for evaluation"
        )
    return seqs[order[n_held:]], seqs[order[:n_held]]


def text_data(spec: DataSpec, tokenizer: Tokenizer) -> TokenData:
    if spec.context_length is None:
        raise StageError("a text corpus needs a context_length")
    seqs = pack(
        load_texts(spec.corpus, spec.text_field), tokenizer, spec.context_length, spec.max_tokens
    )
    train, held = split_heldout(seqs, spec.heldout_fraction, spec.seed)
    return TokenData(train[:, :-1], train[:, 1:], held[:, :-1], held[:, 1:], tokenizer, spec)


# ----------------------------------------------------------------------------- dispatch


def build_data(spec: DataSpec, tokenizer: Tokenizer | None = None) -> TokenData:
    if (spec.task is None) == (spec.corpus is None):
        raise StageError("data needs exactly one of `task` and `corpus`")
    if spec.task == "addition":
        from .toy import addition_data  # noqa: PLC0415  (toy and data import each other's types)

        return addition_data(spec)
    if tokenizer is None:
        raise StageError("text data needs the model's tokenizer (tokenizer.json in the model dir)")
    return text_data(spec, tokenizer)


def save_data_spec(model_dir: str | os.PathLike, spec: DataSpec) -> None:
    write_json(Path(model_dir) / DATA_FILE, spec.model_dump(mode="json"))


def load_token_data(
    model_dir: str | os.PathLike, data: DataSpec | None = None, context_length: int | None = None
) -> TokenData:
    """The model's own data (its data.json) unless `data` is given; optionally at another context length."""
    from .modeldir import is_own_model_dir, load_tokenizer, read_model_config  # noqa: PLC0415  (modeldir imports torch models)

    model_dir = Path(model_dir)
    if data is None:
        if not (model_dir / DATA_FILE).is_file():
            raise MissingInputError(
                f"{model_dir} records no training data ({DATA_FILE}); pass the data explicitly"
            )
        data = DataSpec(**read_json(model_dir / DATA_FILE))
    if context_length is not None:
        data = data.model_copy(update={"context_length": context_length})
    cfg = read_model_config(model_dir) if is_own_model_dir(model_dir) else None
    if (
        cfg is not None
        and data.context_length is not None
        and data.context_length > cfg.context_length
    ):
        raise StageError(
            f"context length {data.context_length} is longer than the model's {cfg.context_length}"
        )
    return build_data(data, load_tokenizer(model_dir))
