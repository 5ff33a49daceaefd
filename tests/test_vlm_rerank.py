"""vlm rerank mode: a tiny VLM re-dividing a tiny timm run's top-K probability mass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_vlm import check_run_contract
from vlm_fixtures import tiny_config

from kit.config import load_config
from kit.errors import KitError
from kit.folds import load_folds
from kit.preds import load_predictions
from kit.train.driver import train_run
from kit.vlm.features import encoded_batches
from kit.vlm.inputs import Prompter, pad_right
from kit.vlm.model import load_vlm
from kit.vlm.rerank import candidates, combine, with_truth
from kit.vlm.scoring import candidate_prompt, label_scores

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_run(vlm_root) -> str:
    """A finished 2-fold run of the tiny timm preset: the candidates to re-rank."""
    train_run(load_config("tiny", ["name=tiny_base", "epochs=1", "workers=0", "device=cpu"]), vlm_root)
    return "tiny_base"


@pytest.mark.parametrize("model, score, k", [("qwen", "label", 2), ("llava", "letter", 3)])
def test_rerank_run_keeps_the_base_probabilities_outside_the_top_k(
    model, score, k, base_run, tiny_qwen, tiny_llava, vlm_root
):
    path = tiny_qwen if model == "qwen" else tiny_llava
    name = f"rerank_{model}"
    cfg = tiny_config(
        path,
        f"name={name}",
        "vlm.head=rerank",
        f"vlm.base_run={base_run}",
        f"vlm.top_k={k}",
        f"vlm.rerank_score={score}",
    )
    assert train_run(cfg, vlm_root).complete
    run_dir = vlm_root / "runs" / name
    check_run_contract(run_dir, vlm_root, fold_files={"adapter_config.json", "adapter_model.safetensors"})
    for kind in ("oof", "test"):
        base = np.exp(load_predictions(vlm_root / "runs" / base_run / f"{kind}.npz").logp.astype(np.float64))
        ours = np.exp(load_predictions(run_dir / f"{kind}.npz").logp.astype(np.float64))
        top = candidates(np.log(base), k)
        outside = np.ones_like(base, dtype=bool)
        outside[np.arange(len(base))[:, None], top] = False
        np.testing.assert_allclose(ours[outside], base[outside], rtol=1e-5)
        rows = np.arange(len(base))[:, None]
        np.testing.assert_allclose(ours[rows, top].sum(1), base[rows, top].sum(1), rtol=1e-5)
        assert not np.allclose(ours, base)  # the VLM did re-divide the candidates' mass


def test_a_missing_base_run_is_named(tiny_qwen, vlm_root):
    cfg = tiny_config(tiny_qwen, "name=rerank_missing", "vlm.head=rerank", "vlm.base_run=nope")
    with pytest.raises(KitError, match="nope"):
        train_run(cfg, vlm_root)


@pytest.mark.parametrize("model", ["qwen", "llava"])
def test_label_scores_with_the_shared_prompt_match_full_sequences(model, tiny_qwen, tiny_llava, vlm_root):
    """The prompt's KV cache repeated K times scores each answer as a full forward of prompt + answer does."""
    cfg = tiny_config(tiny_qwen if model == "qwen" else tiny_llava)
    prompter = Prompter.load(cfg)
    vl = load_vlm(cfg, CPU, lm_head=True, trainable=False)
    vl.train(False)
    path = load_folds(vlm_root).train["path"].iloc[0]
    _, (image,) = next(encoded_batches(vl, prompter, [path], np.arange(1), 1, 0))
    names = ["cat", "dog", "a bird", "x"]
    prompt = prompter.prompt_ids(candidate_prompt(cfg.vlm.prompt, names, letters=False), image.features.shape[0])
    answers = [prompter.answer_ids(n) for n in names]
    pad = prompter.tokenizer.pad_token_id
    with torch.no_grad():
        fast = label_scores(vl, prompt, image, answers, pad)
        ids, mask = pad_right([prompt + a for a in answers], pad)
        logp = torch.log_softmax(vl.lm_head(vl.hidden(ids, mask, [image] * len(answers))).float(), dim=-1)
        slow = torch.stack(
            [sum(logp[i, len(prompt) - 1 + j, t] for j, t in enumerate(a)) for i, a in enumerate(answers)]
        )
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-4)


def test_combine_and_training_candidates():
    base = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    cands = candidates(base, 2)
    assert cands.tolist() == [[0, 1], [2, 3]]
    out = np.exp(combine(base, cands, np.array([[0.0, 0.0], [np.log(3), 0.0]])))
    np.testing.assert_allclose(out, [[0.4, 0.4, 0.15, 0.05], [0.1, 0.2, 0.525, 0.175]])
    # a missed true class replaces the least probable candidate; class order is kept
    assert with_truth(cands, base, np.array([3, 2])).tolist() == [[0, 3], [2, 3]]
