"""What a user asks attribution about: the prompt's tokens and the logit targets.

A target is a token (its mean-centred logit: logit_v - mean_u logit_u) or a logit difference
(logit_a - logit_b). Targets given as strings are token texts, optionally JSON-quoted so that
spaces survive a shell (`'" 5"'`), or a difference of two quoted texts: `'" 5" - " 6"'`.
Without targets, the salient logits: the most probable tokens until their cumulative
probability reaches `desired_logit_prob`, at most `max_n_logits` of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
from tokenizers import Tokenizer

from ..errors import StageError

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_DIFFERENCE = re.compile(rf"^\s*({_QUOTED})\s*-\s*({_QUOTED})\s*$")

TargetSpec = str | int | tuple[str | int, str | int]


class LogitTarget(NamedTuple):
    label: str  # the token's text, or '" 5" - " 6"' for a difference
    token_id: int  # the vocab id; vocab_size + (index among targets) for a difference
    plus: int
    minus: int | None  # None: the mean over the vocabulary (a mean-centred logit)
    prob: float  # the model's probability of `plus` at the last position

    def direction(self, W_U: torch.Tensor) -> torch.Tensor:
        """The gradient of this target with respect to the final norm's output: M."""
        other = W_U.mean(0) if self.minus is None else W_U[self.minus]
        return W_U[self.plus] - other


def decode_tokens(tokens: torch.Tensor, tokenizer: Tokenizer | None) -> list[str]:
    if tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return [tokenizer.decode([t], skip_special_tokens=False) for t in tokens.tolist()]


def _unknown_pieces(prompt: str, tokenizer: Tokenizer) -> list[str]:
    """Parts of `prompt` a vocabulary with an unknown token (word-level, say) maps to it."""
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    if unk_id is None:
        return []  # byte-level BPE and the like: every text has tokens
    enc = tokenizer.encode(prompt, add_special_tokens=False)
    pieces = [prompt[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i == unk_id]
    return sorted({p for p in pieces if p != unk})


def tokenize_prompt(
    prompt: str | Sequence[int] | torch.Tensor,
    tokenizer: Tokenizer | None,
    *,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Token ids of a prompt given as text (needs the model's tokenizer) or as ids.

    bos_token_id: the BOS the model was trained with, put first unless the prompt starts with
    it already (text prompts only: ids are taken as given). Text holding pieces the vocabulary
    does not have is refused, naming them, rather than read as its unknown token."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise StageError("the model has no tokenizer.json: give the prompt as token ids")
        unknown = _unknown_pieces(prompt, tokenizer)
        if unknown:
            raise StageError(
                f"the prompt {prompt!r} holds {', '.join(map(repr, unknown))}, which the model's "
                "vocabulary does not have"
            )
        ids = tokenizer.encode(prompt).ids
        if not ids:
            raise StageError(f"the prompt {prompt!r} encodes to no tokens")
        if bos_token_id is not None and ids[0] != bos_token_id:
            ids = [bos_token_id, *ids]
        return torch.tensor(ids, dtype=torch.long)
    return torch.as_tensor(prompt, dtype=torch.long).flatten()


def describe_tokens(tokens: torch.Tensor, tokenizer: Tokenizer | None) -> str:
    """How a prompt was tokenised, for the log: `7 tokens: <bos> | 3 | 6 | + | 4 | 7 | =`."""
    texts = decode_tokens(tokens, tokenizer)
    return f"{len(texts)} tokens: " + " | ".join(json.dumps(t)[1:-1] for t in texts)


def token_id(spec: str | int, tokenizer: Tokenizer | None, vocab_size: int) -> int:
    """The vocabulary id of one target token, or a ValueError naming it."""
    if isinstance(spec, int):
        if not 0 <= spec < vocab_size:
            raise StageError(f"target token id {spec} is outside the vocabulary of {vocab_size}")
        return spec
    text = json.loads(spec) if re.fullmatch(_QUOTED, spec.strip()) else spec
    if tokenizer is None:
        raise StageError(f"target {text!r} is text but the model has no tokenizer: give token ids")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    # A word-level vocabulary maps unknown text to its unknown token: check the round trip.
    if len(ids) != 1 or text not in (
        tokenizer.decode(ids, skip_special_tokens=False),
        tokenizer.id_to_token(ids[0]),
    ):
        raise StageError(
            f"target {text!r} is not a single token of the vocabulary (it encodes to {ids})"
        )
    if ids[0] >= vocab_size:
        raise StageError(
            f"target {text!r} has id {ids[0]}, outside the model's vocabulary of {vocab_size}"
        )
    return ids[0]


def salient_logits(probs: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> list[int]:
    """The most probable tokens until their cumulative probability reaches the desired one."""
    top = probs.topk(min(max_n_logits, probs.numel()))
    n = (
        int(
            torch.searchsorted(
                top.values.cumsum(0), torch.tensor(desired_logit_prob, dtype=probs.dtype)
            )
        )
        + 1
    )
    return top.indices[: min(n, top.indices.numel())].tolist()


def resolve_targets(
    specs: Sequence[TargetSpec] | None,
    last_logits: torch.Tensor,
    tokenizer: Tokenizer | None,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> list[LogitTarget]:
    """Logit targets at the last position: the user's, or the salient ones."""
    V = last_logits.shape[-1]
    probs = last_logits.float().softmax(-1)

    def label(i: int) -> str:
        return decode_tokens(torch.tensor([i]), tokenizer)[0]

    if not specs:
        return [
            LogitTarget(label(i), i, i, None, float(probs[i]))
            for i in salient_logits(probs, max_n_logits, desired_logit_prob)
        ]
    targets = []
    for n, spec in enumerate(specs):
        pair = spec if isinstance(spec, tuple) else None
        if isinstance(spec, str) and (m := _DIFFERENCE.match(spec)):
            pair = m.groups()
        if pair is not None:
            a, b = (token_id(s, tokenizer, V) for s in pair)
            targets.append(
                LogitTarget(
                    f"{json.dumps(label(a))} - {json.dumps(label(b))}", V + n, a, b, float(probs[a])
                )
            )
        else:
            i = token_id(spec, tokenizer, V)
            targets.append(LogitTarget(label(i), i, i, None, float(probs[i])))
    return targets
