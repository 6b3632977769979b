"""The 2-digit addition toy (the paper's Figure 1 setting): digits as tokens.

A sequence is `<bos> a1 a0 + b1 b0 = s2 s1 s0`; the loss is taken on the three sum digits
only, since the operands are random. Exact match over the sum digits under teacher forcing
equals greedy decoding's exact match: every forced prefix is then the model's own.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import StageError
from .data import DataSpec, TokenData

VOCAB = ["<bos>", *"0123456789", "+", "="]
SEQ_LEN = 10  # <bos> a1 a0 + b1 b0 = s2 s1 s0
ANSWER_TARGETS = slice(6, 9)  # targets (sequence shifted by one) that are sum digits


def addition_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("<bos>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def addition_text(a: int, b: int) -> str:
    return f"<bos>{a:02d}+{b:02d}={a + b:03d}"


def addition_sequences() -> torch.Tensor:
    """All 10,000 problems as token ids [10000, SEQ_LEN]."""
    texts = [addition_text(a, b) for a in range(100) for b in range(100)]
    return torch.tensor([enc.ids for enc in addition_tokenizer().encode_batch(texts)])


def addition_data(spec: DataSpec) -> TokenData:
    """Held-out problems are disjoint from training ones (a seeded split of all 10,000)."""
    if spec.context_length is not None and spec.context_length != SEQ_LEN - 1:
        raise StageError(
            f"the addition task has context length {SEQ_LEN - 1}, not {spec.context_length}"
        )
    seqs = addition_sequences()
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(spec.seed))
    n_held = int(round(spec.heldout_fraction * len(seqs)))
    inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()
    mask = torch.ones_like(targets, dtype=torch.bool)
    mask[:, ANSWER_TARGETS] = False
    targets[mask] = -100
    train, held = order[n_held:], order[:n_held]
    spec = spec.model_copy(update={"context_length": SEQ_LEN - 1})
    return TokenData(
        inputs[train], targets[train], inputs[held], targets[held], addition_tokenizer(), spec
    )


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sequence: every scored target predicted by argmax. logits B,T,V; targets B,T."""
    scored = targets != -100
    return ((logits.argmax(-1) == targets) | ~scored).all(-1)


# ----------------------------------------------------------------------------- a text toy
# Short structured examples, one per line (a small list operation or a record lookup), for
# the text pipeline (`pretrain --corpus` → `sparsify`): most tokens are predictable from a
# few earlier ones, by copying, sorting or looking a field up.

WORDS = "amber birch cedar delta ember fjord grove heron iris juniper kestrel lotus maple".split()
CITIES = "Oslo Lima Quito Porto Kyoto Dakar Perth Tunis Hanoi Turin".split()


def record_example(rng: random.Random) -> str:
    kind = rng.randrange(4)
    items = rng.sample(WORDS, rng.randint(3, 6))
    if kind == 0:
        return f"sort {' '.join(items)} -> {' '.join(sorted(items))}"
    if kind == 1:
        return f"reverse {' '.join(items)} -> {' '.join(reversed(items))}"
    if kind == 2:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return f"max of {' '.join(map(str, numbers))} is {max(numbers)}"
    name, city, age = rng.choice(WORDS).title(), rng.choice(CITIES), rng.randint(18, 90)
    field = rng.choice(["city", "age"])
    value = city if field == "city" else age
    return f"record name={name} city={city} age={age} ; {field} of {name} = {value}"


def records_corpus(kilobytes: float, seed: int = 0) -> str:
    """About `kilobytes` of examples, one per line."""
    rng, lines, size = random.Random(seed), [], 0
    while size < kilobytes * 1000:
        lines.append(record_example(rng))
        size += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"
