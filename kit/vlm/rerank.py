"""vlm rerank mode: re-score another run's top-K classes with a LoRA-tuned VLM.

For every image the base run's K most probable classes are put in the prompt and scored by the VLM
(kit.vlm.scoring); the K candidates share the probability mass the base run gave them, re-divided by
the VLM's softmax over its K scores, and every other class keeps the base run's probability:

    p(c) = base(c)                                   c not in top-K
    p(c) = sum(base(top-K)) * softmax(scores)[c]     c in top-K

Training rows take their candidates from the base run's OOF predictions and test rows from its test
predictions, so no row's candidates come from a model that saw that row's label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kit.config import TrainConfig
from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.preds import load_source, to_logp
from kit.train.loop import evaluate
from kit.train.runtime import autocast, default_workers, resolve_device, start_fold
from kit.vlm.features import encoded_batches, run_cache
from kit.vlm.inputs import Prompter
from kit.vlm.model import VisionLanguage, load_vlm, save_adapter
from kit.vlm.scoring import candidate_prompt, label_scores, letter_ids, letter_loss, letter_scores, sequence_loss
from kit.vlm.trainer import LoraTrainer, fit_epochs


@dataclass
class BaseRun:
    """The base run's log-probabilities: OOF for training rows, the fold-average for test rows."""

    name: str
    train: np.ndarray  # [N, C], folds/train.csv order
    test: np.ndarray  # [M, C], folds/test.csv order


def load_base_run(cfg: TrainConfig, folds: Folds) -> BaseRun:
    if cfg.vlm.base_run == cfg.name:
        raise KitError(f"vlm.base_run {cfg.vlm.base_run!r}: a rerank run cannot re-rank itself")
    source = load_source(folds.root, cfg.vlm.base_run, folds)
    oof, test = source.oof, source.test
    if list(oof.ids) != folds.train["id"].tolist() or list(test.ids) != folds.test["id"].tolist():
        raise KitError(f"{source.path}: its oof/test ids do not match folds/")
    return BaseRun(source.name, oof.logp.astype(np.float64), test.logp.astype(np.float64))


def check_base_run(cfg: TrainConfig, folds: Folds) -> None:
    base = load_base_run(cfg, folds)
    if base.train.shape[1] < cfg.vlm.top_k:
        raise KitError(f"vlm.top_k {cfg.vlm.top_k}: the base run has only {base.train.shape[1]} classes")


def candidates(logp: np.ndarray, k: int) -> np.ndarray:
    """[N, K] the K most probable classes per row, in class order (the prompt lists them so)."""
    return np.sort(np.argsort(-logp, axis=1, kind="stable")[:, :k], axis=1)


def with_truth(cands: np.ndarray, logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Training candidates: where the true class was missed, it replaces the least probable candidate,
    so every training prompt has a right answer to learn (class order hides where it went)."""
    cands = cands.copy()
    for i in np.flatnonzero(~(cands == labels[:, None]).any(axis=1)):
        cands[i, np.argmin(logp[i, cands[i]])] = labels[i]
        cands[i].sort()
    return cands


def combine(base_logp: np.ndarray, cands: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Base probabilities with each row's candidate mass re-divided by softmax(scores)."""
    probs = np.exp(base_logp)
    rows = np.arange(len(probs))[:, None]
    mass = probs[rows, cands].sum(axis=1, keepdims=True)
    share = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs[rows, cands] = mass * share / share.sum(axis=1, keepdims=True)
    return to_logp(probs)


class Reranker:
    """Prompts, training losses and scores of one VLM over given candidates."""

    def __init__(self, cfg: TrainConfig, prompter: Prompter, vl: VisionLanguage, classes: list[str]):
        self.cfg, self.prompter, self.vl, self.classes = cfg, prompter, vl, classes
        self.letters = cfg.vlm.rerank_score == "letter"
        self.letter_ids = letter_ids(prompter, cfg.vlm.top_k) if self.letters else []
        self.pad = prompter.tokenizer.pad_token_id or 0

    def prompt(self, cands: np.ndarray, n_tokens: int) -> list[int]:
        text = candidate_prompt(self.cfg.vlm.prompt, [self.classes[c] for c in cands], self.letters)
        return self.prompter.prompt_ids(text, n_tokens)

    def loss(self, images, cands: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        prompts = [self.prompt(c, im.features.shape[0]) for c, im in zip(cands, images, strict=True)]
        if self.letters:
            truth = torch.tensor([int(np.flatnonzero(c == y)[0]) for c, y in zip(cands, labels, strict=True)])
            return letter_loss(self.vl, prompts, images, self.letter_ids, truth, self.pad)
        answers = [self.prompter.answer_ids(self.classes[y]) for y in labels]
        return sequence_loss(self.vl, prompts, answers, images, self.pad)

    @torch.no_grad()
    def scores(self, images, cands: np.ndarray) -> np.ndarray:
        """[B, K] candidate scores (log-probabilities up to a per-row constant)."""
        prompts = [self.prompt(c, im.features.shape[0]) for c, im in zip(cands, images, strict=True)]
        if self.letters:
            return letter_scores(self.vl, prompts, images, self.letter_ids, self.pad).cpu().numpy()
        out = []
        for prompt, image, row in zip(prompts, images, cands, strict=True):
            answers = [self.prompter.answer_ids(self.classes[c]) for c in row]
            out.append(label_scores(self.vl, prompt, image, answers, self.pad).cpu())
        return torch.stack(out).numpy()

    def predict(self, batches, base_logp: np.ndarray, device: torch.device) -> np.ndarray:
        """logp [N, C] of the rows `batches` yields, in order; base_logp is indexed by the batch keys."""
        self.vl.train(False)
        cands = candidates(base_logp, self.cfg.vlm.top_k)
        scores = np.zeros(cands.shape)
        for keys, images in batches:
            with autocast(device, self.cfg.precision):
                scores[keys] = self.scores(images, cands[keys])
        return combine(base_logp, cands, scores)


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    device = start_fold(cfg, fold)
    base = load_base_run(cfg, folds)
    prompter = Prompter.load(cfg)
    vl = load_vlm(cfg, device, lm_head=True)
    reranker = Reranker(cfg, prompter, vl, folds.classes)
    paths, labels = np.array(folds.train["path"].tolist(), dtype=object), folds.labels
    train_rows, valid_rows = folds.split(fold)
    train_cands = with_truth(candidates(base.train, cfg.vlm.top_k), base.train, labels)
    trainer = LoraTrainer(cfg, vl, None, device, -(-len(train_rows) // cfg.batch_size))
    trainer.resume_if_any(fold_dir)
    cache = run_cache(cfg, folds.sha256)
    workers = default_workers(cfg.workers)

    def batches(rows: np.ndarray, size: int = cfg.batch_size):
        return encoded_batches(vl, prompter, list(paths[rows]), rows, size, workers, cache)

    def loss_fn(batch) -> tuple[torch.Tensor, int]:
        rows, images = batch
        return reranker.loss(images, train_cands[rows], labels[rows]), len(rows)

    def validate() -> dict:
        # keys 0..V-1 index the valid rows' base predictions; the cache is keyed by train-table row
        keyed = ((np.searchsorted(valid_rows, rows), images) for rows, images in batches(valid_rows))
        logp = reranker.predict(keyed, base.train[valid_rows], device)
        return evaluate(logp, labels[valid_rows])

    save_best = lambda: save_adapter(vl.model, fold_dir)  # noqa: E731
    fit_epochs(cfg, trainer, fold, fold_dir, train_rows, batches, loss_fn, validate, save_best, on_epoch_end)


def base_logp_for(cfg: TrainConfig, base: BaseRun, folds: Folds, paths: list[str]) -> np.ndarray:
    """The base run's predictions of these images: OOF rows, test rows, or the base run's fold models."""
    for table, logp in ((folds.train, base.train), (folds.test, base.test)):
        index = {p: i for i, p in enumerate(table["path"])}
        if all(p in index for p in paths):
            return logp[[index[p] for p in paths]]
    from kit.predict import predict_run

    return predict_run(folds.root, base.name, list(paths)).astype(np.float64)


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    """The fold's adapter re-ranking the base run's candidates, as a function of image paths."""
    device = resolve_device(cfg.device)
    folds = load_folds(root)
    base = load_base_run(cfg, folds)
    prompter = Prompter.load(cfg)
    vl = load_vlm(cfg, device, lm_head=True, adapter_dir=Path(run_dir) / f"fold{fold}", trainable=False)
    reranker = Reranker(cfg, prompter, vl, folds.classes)
    size = cfg.predict_batch_size or 2 * cfg.batch_size

    def predict(paths: list[str]) -> np.ndarray:
        keys = np.arange(len(paths))
        batches = encoded_batches(vl, prompter, list(paths), keys, size, default_workers(cfg.workers))
        return reranker.predict(batches, base_logp_for(cfg, base, folds, paths), device)

    return predict
