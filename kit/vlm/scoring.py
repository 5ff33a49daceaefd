"""Scoring K candidate answers with a VLM's language-model head, for re-ranking.

Two ways, both returning one score per candidate (a log-probability up to a per-image constant):
    label   the log-likelihood of each candidate's class name (plus end-of-turn token). The prompt with
            the image runs once; its KV cache is repeated K times and only the K short answers run after it.
    letter  the options are listed as A., B., ...; one forward, the logits of the K letter tokens.

And the two matching training losses (teacher forcing on the true answer).
"""

from __future__ import annotations

import string

import torch
import torch.nn.functional as F

from kit.errors import KitError
from kit.vlm.inputs import Prompter, pad_right
from kit.vlm.model import EncodedImage, VisionLanguage

LETTERS = string.ascii_uppercase


def candidate_prompt(prompt: str, names: list[str], letters: bool) -> str:
    """The configured prompt with the candidates: in place of {candidates}, or appended."""
    if letters:
        listing = "\n".join(f"{LETTERS[i]}. {name}" for i, name in enumerate(names))
        listing = f"Options:\n{listing}\nAnswer with the letter of the right option."
    else:
        listing = "Candidates: " + "; ".join(names) + "."
    return prompt.replace("{candidates}", listing) if "{candidates}" in prompt else f"{prompt}\n{listing}"


def letter_ids(prompter: Prompter, k: int) -> list[int]:
    ids = [prompter.answer_ids(letter, end=False) for letter in LETTERS[:k]]
    if any(len(i) != 1 for i in ids):
        raise KitError("vlm.rerank_score=letter: this tokenizer splits the letters A-Z; use rerank_score=label")
    return [i[0] for i in ids]


def _answer_logits(vl: VisionLanguage, hidden: torch.Tensor) -> torch.Tensor:
    return vl.lm_head(hidden).float()


def sequence_loss(
    vl: VisionLanguage,
    prompts: list[list[int]],
    answers: list[list[int]],
    images: list[EncodedImage],
    pad_id: int,
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given prompt + image (teacher forcing)."""
    ids, mask = pad_right([p + a for p, a in zip(prompts, answers, strict=True)], pad_id)
    hidden = vl.hidden(ids, mask, images)
    rows = torch.cat([torch.full((len(a),), i) for i, a in enumerate(answers)])
    cols = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(a)) for p, a in zip(prompts, answers, strict=True)])
    targets = torch.tensor([t for a in answers for t in a], device=hidden.device)
    return F.cross_entropy(_answer_logits(vl, hidden[rows, cols]), targets)


def letter_loss(
    vl: VisionLanguage,
    prompts: list[list[int]],
    images: list[EncodedImage],
    letters: list[int],
    truth: torch.Tensor,
    pad_id: int,
) -> torch.Tensor:
    """Cross-entropy over the K option letters only: the same softmax the scores use."""
    return F.cross_entropy(letter_scores(vl, prompts, images, letters, pad_id), truth.to(vl.device))


def letter_scores(
    vl: VisionLanguage, prompts: list[list[int]], images: list[EncodedImage], letters: list[int], pad_id: int
) -> torch.Tensor:
    """[B, K] logits of the option letters at the last prompt token, one forward for the batch."""
    ids, mask = pad_right(prompts, pad_id)
    hidden = vl.hidden(ids, mask, images)
    last = hidden[torch.arange(len(prompts)), mask.sum(1).to(hidden.device) - 1]
    return _answer_logits(vl, last)[:, letters]


def label_scores(
    vl: VisionLanguage, prompt: list[int], image: EncodedImage, answers: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[K] summed log-probabilities of each answer after one image's prompt, the prompt run once."""
    ids, mask = pad_right([prompt], pad_id)
    embeds, positions = vl.embed(ids, mask, [image])
    hidden, cache = vl.run(embeds, mask.to(vl.device), positions, use_cache=True)
    first = F.log_softmax(_answer_logits(vl, hidden[:, -1]), dim=-1)[0]  # [V]: each answer's first token
    k, length = len(answers), max(len(a) for a in answers)
    scores = torch.stack([first[a[0]] for a in answers])
    if length == 1:
        return scores
    rest, rest_mask = pad_right([a[:-1] for a in answers], pad_id)  # inputs predicting tokens 1..n-1
    if not hasattr(cache, "batch_repeat_interleave"):
        raise KitError("this transformers version's KV cache cannot be repeated; use vlm.rerank_score=letter")
    cache.batch_repeat_interleave(k)
    start = len(prompt) if positions is None else int(positions.max()) + 1
    steps = torch.arange(start, start + rest.shape[1], device=vl.device).expand(k, -1)
    positions = steps if positions is None else steps.unsqueeze(0).expand(3, -1, -1)
    full_mask = torch.cat([torch.ones(k, len(prompt), dtype=torch.long), rest_mask], dim=1).to(vl.device)
    embeds = vl.language_model.get_input_embeddings()(rest.to(vl.device))
    hidden, _ = vl.run(embeds, full_mask, positions, cache=cache, use_cache=True)
    logp = F.log_softmax(_answer_logits(vl, hidden), dim=-1)  # [K, n-1, V]
    for i, answer in enumerate(answers):
        if len(answer) > 1:
            targets = torch.tensor(answer[1:], device=vl.device)
            scores[i] = scores[i] + logp[i, torch.arange(len(answer) - 1), targets].sum()
    return scores
