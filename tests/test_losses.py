"""Loss maths on random tensors against hand-written formulae, and the all-gathered InfoNCE over 2 gloo
processes against one process holding the whole global batch (loss and gradients)."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_train.losses import NegativeSampler, info_nce, sgns_loss


def _ref_info_nce(q, d, t, symmetric=True, q_ids=None, d_ids=None):
    """Row-by-row loops: -log(exp(s_ii/t) / sum_j exp(s_ij/t)), skipping same-item candidates."""
    q, d = q.double(), d.double()
    n = q.shape[0]

    def direction(x, y, x_ids, y_ids):
        total = 0.0
        for i in range(n):
            pos = math.exp(float(x[i] @ y[i]) / t)
            den = 0.0
            for j in range(n):
                if j != i and x_ids is not None and (y_ids[j] == y_ids[i] or y_ids[j] == x_ids[i]):
                    continue
                den += math.exp(float(x[i] @ y[j]) / t)
            total += -math.log(pos / den)
        return total / n

    loss = direction(q, d, q_ids, d_ids)
    if symmetric:
        loss = 0.5 * (loss + direction(d, q, d_ids, q_ids))
    return loss


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_formula(symmetric):
    q, d = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    got = info_nce(q, d, temperature=0.1, symmetric=symmetric, gather=False)
    assert float(got) == pytest.approx(_ref_info_nce(q, d, 0.1, symmetric), rel=1e-9)


def test_info_nce_masks_false_negatives():
    q, d = _unit(5, 4, seed=3), _unit(5, 4, seed=4)
    q_ids = torch.tensor([10, 11, 12, 13, 14])
    d_ids = torch.tensor([20, 20, 10, 21, 22])  # rows 0 and 1 share their positive; row 2's positive is row 0's anchor
    got = info_nce(q, d, 0.2, q_ids=q_ids, d_ids=d_ids, gather=False)
    want = _ref_info_nce(q, d, 0.2, True, q_ids.tolist(), d_ids.tolist())
    assert float(got) == pytest.approx(want, rel=1e-9)
    assert float(got) != pytest.approx(_ref_info_nce(q, d, 0.2), rel=1e-6)  # the mask changed something


def test_info_nce_learned_temperature_gets_gradient():
    q, d = _unit(4, 3, seed=5), _unit(4, 3, seed=6)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    info_nce(q, d, 1.0 / log_scale.exp(), gather=False).backward()
    assert log_scale.grad is not None and float(log_scale.grad.abs()) > 0


def test_sgns_matches_formula():
    g = torch.Generator().manual_seed(0)
    c, o = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    neg = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=torch.float64)

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    per = []
    for i in range(4):
        val = -math.log(sig(float(c[i] @ o[i])))
        val -= sum(math.log(sig(-float(neg[i, k] @ c[i]))) for k in range(3))
        per.append(val)
    assert float(sgns_loss(c, o, neg)) == pytest.approx(np.mean(per), rel=1e-9)
    assert float(sgns_loss(c, o, neg, w)) == pytest.approx(float(np.dot(per, w.numpy()) / w.sum()), rel=1e-9)


def test_negative_sampler_follows_freq_power():
    freq = np.array([1, 4, 16, 0])
    for alpha in (0.75, 0.0, -0.5):
        s = NegativeSampler(freq, alpha=alpha, seed=0)
        draws = s.sample(20000, 5).numpy().ravel()
        p = np.array([1, 4, 16], float) ** alpha
        p /= p.sum()
        emp = np.bincount(draws, minlength=4) / draws.size
        assert emp[3] == 0  # never an unseen item
        np.testing.assert_allclose(emp[:3], p, atol=0.01)


# --------------------------------------------------------------------------------- 2-process gather
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, q_all, d_all, ids_q, ids_d, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = q_all.shape[0] // world
        q = q_all[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        d = d_all[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = info_nce(q, d, 0.07, q_ids=ids_q[rank * b : (rank + 1) * b], d_ids=ids_d[rank * b : (rank + 1) * b])
        loss.backward()
        out[rank] = (loss.item(), q.grad.clone(), d.grad.clone())
        dist.barrier()  # leave together: tearing gloo down under a connected peer can abort
    finally:
        dist.destroy_process_group()


def test_all_gather_info_nce_equals_single_process():
    import torch.multiprocessing as mp

    world, b = 2, 4
    q_all, d_all = _unit(world * b, 6, seed=7), _unit(world * b, 6, seed=8)
    ids_q = torch.arange(world * b)
    ids_d = torch.tensor([100, 101, 102, 100, 104, 105, 101, 107])  # duplicates across workers too

    qs, ds = q_all.clone().requires_grad_(True), d_all.clone().requires_grad_(True)
    single = info_nce(qs, ds, 0.07, gather=False, q_ids=ids_q, d_ids=ids_d)
    single.backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), q_all, d_all, ids_q, ids_d, out), nprocs=world, join=True)
    losses = [out[r][0] for r in range(world)]
    # mean over workers (what DDP's gradient averaging optimises) == the global-batch loss
    assert np.mean(losses) == pytest.approx(single.item(), rel=1e-9)
    # each worker's input gradient (summed over every worker's loss by the gather's backward),
    # averaged over workers as DDP does, equals the single-process gradient rows
    for r in range(world):
        _, gq, gd = out[r]
        torch.testing.assert_close(gq / world, qs.grad[r * b : (r + 1) * b], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gd / world, ds.grad[r * b : (r + 1) * b], rtol=1e-9, atol=1e-12)


def test_masked_lm_loss_is_the_summed_nll_of_the_full_head():
    """Projecting masked positions only gives BertForMaskedLM's own loss (a mean) times the count."""
    from transformers import BertConfig, BertForMaskedLM

    from ray_train.losses import MaskedLMLoss

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    mlm.eval()
    ids = torch.randint(5, 50, (3, 7))  # (B, T)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 3], labels[2, 2] = 7, 9, 11
    ours = MaskedLMLoss(mlm)(input_ids=ids, attention_mask=mask, labels=labels)
    ref = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss * 3
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
