"""train-items end to end on a tiny synthetic lake with real local Ray Train (2 workers): two disjoint
item groups that never share a basket; a cold item (never in a session) with group A's words."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from common.config import ConfigError, build_config
from common.lake import write_arrow

GROUPS = {"A": "red apple fruit", "B": "blue engine motor"}
COLD = "A_cold"


def _build_lake(lake: str) -> None:
    rng = np.random.default_rng(0)
    items = {g: [f"{g}{i}" for i in range(8)] for g in GROUPS}
    rows = []
    ts = datetime(2011, 1, 1, tzinfo=timezone.utc)
    for n in range(240):
        g = "A" if n % 2 else "B"
        basket = list(rng.choice(items[g], size=int(rng.integers(2, 5)), replace=False))
        rows.append({"session_id": f"s{n}", "user_id": f"u{n % 10}", "item_ids": basket, "start_ts": ts, "end_ts": ts,
                     "length": len(basket), "split": "train" if n < 200 else "test"})  # fmt: skip
    write_arrow(pa.Table.from_pylist(rows), lake, "sessions", mode="overwrite")
    train = [r["item_ids"] for r in rows if r["split"] == "train"]
    freq = Counter(i for s in train for i in s)
    cnt, w = Counter(), defaultdict(float)
    for s in train:
        for a, b in itertools.permutations(s, 2):
            cnt[a, b] += 1
            w[a, b] += 1.0 / (len(s) - 1)
    co = [{"item_a": a, "item_b": b, "count": c, "weight": w[a, b], "freq_a": freq[a], "freq_b": freq[b],
           "cosine": c / np.sqrt(freq[a] * freq[b]), "ppmi": max(0.0, float(np.log(c * len(train) / (freq[a] * freq[b])))),
           "bucket": hash(a) % 2} for (a, b), c in cnt.items()]  # fmt: skip
    write_arrow(pa.Table.from_pylist(co), lake, "cooccurrence", mode="overwrite")
    # one pseudo-basket per customer (same recency everywhere: r = 1), pairs of at least 2 customers
    per_user = defaultdict(set)
    for r in rows:
        if r["split"] == "train":
            per_user[r["user_id"]].update(r["item_ids"])
    customers, cw = Counter(), defaultdict(float)
    for bought in per_user.values():
        for a, b in itertools.permutations(sorted(bought), 2):
            customers[a, b] += 1
            cw[a, b] += 1.0 / (len(bought) - 1)
    cu = [{"item_a": a, "item_b": b, "customers": c, "weight": cw[a, b], "bucket": hash(a) % 2} for (a, b), c in customers.items() if c >= 2]
    write_arrow(pa.Table.from_pylist(cu), lake, "customer_cooccurrence", mode="overwrite")
    cat = [{"item_id": i, "title": f"{GROUPS[g]} {i[1:]}"} for g in GROUPS for i in items[g]]
    cat.append({"item_id": COLD, "title": f"{GROUPS['A']} cold"})
    write_arrow(pa.Table.from_pylist(cat), lake, "catalog", mode="overwrite")


@pytest.fixture(scope="module")
def toy_lake(tmp_path_factory):
    lake = str(tmp_path_factory.mktemp("items") / "lake")
    _build_lake(lake)
    return lake


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT + word-level tokenizer saved as a HF dir (read as kind 'pretrained')."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cold", *" ".join(GROUPS.values()).split(), *map(str, range(10))]
    # transformers 5 ignores `vocab_file=` here (every word became [UNK], so all texts were identical
    # and the text tower could not learn): pass the vocabulary itself, and check it took.
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert tok("red apple cold")["input_ids"] == [2, words.index("red"), words.index("apple"), words.index("cold"), 3]
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _cos_by_group(vecs: dict[str, np.ndarray], query: np.ndarray, exclude: str | None = None) -> dict[str, float]:
    out = {}
    for g in GROUPS:
        sims = [float(v @ query) for i, v in vecs.items() if i.startswith(g) and i != exclude and i != COLD]
        out[g] = float(np.mean(sims))
    return out


def test_config_validation_says_how_to_fix(lake):
    from ray_train.items import ItemsConfig

    with pytest.raises(ConfigError, match="kind"):
        build_config(ItemsConfig, None, lake=lake, kind="word2vec")
    with pytest.raises(ConfigError, match="temperature"):
        build_config(ItemsConfig, None, lake=lake, temperature="0")


def test_id_model_learns_groups(toy_lake, ray_local):
    from common.models import load_encoder, read_meta
    from ray_train.items import ItemsConfig, train_items

    cfg = build_config(ItemsConfig, None, lake=toy_lake, kind="id", dim=16, pairs=8000, batch_size=64, epochs=3,
                       neg_alpha=0.75, subsample=0, workers=2)  # fmt: skip
    res = train_items(cfg)
    meta = read_meta(res["model_dir"])
    assert meta["kind"] == "id" and meta["inputs"]["sessions"] == 0 and meta["dim"] == 16
    assert res["loss"] < res["first_epoch_loss"]
    enc = load_encoder(res["model_dir"], device="cpu")
    ids = [f"{g}{i}" for g in GROUPS for i in range(8)]
    assert enc.has_vector(ids).all() and not enc.has_vector([COLD]).any()
    vecs = dict(zip(ids, enc.embed_items(ids)))
    within, across = [], []
    for i in ids:
        sims = _cos_by_group(vecs, vecs[i], exclude=i)
        within.append(sims[i[0]])
        across.append(sims["B" if i[0] == "A" else "A"])
    assert min(within) > max(across)


def test_fusion_cold_item_lands_in_its_text_group(toy_lake, tiny_bert, ray_local):
    from common.lake import read_pandas
    from common.models import load_encoder, read_meta
    from common.text import render
    from ray_train.items import ItemsConfig, neighbours_by_title, train_items

    cfg = build_config(ItemsConfig, None, lake=toy_lake, kind="fusion", init=tiny_bert, pairs=2048, batch_size=32,
                       epochs=2, text_steps=48, lr=5e-3, temperature=0.1, max_pairs_per_item=0, workers=2)  # fmt: skip
    res = train_items(cfg)
    meta = read_meta(res["model_dir"])
    # the export's text vector = [dense (32) | TF-IDF block over the items' words]
    assert meta["kind"] == "fusion" and meta["pooling"] == "mean" and meta["lexical"]["vocab_size"] == 6
    assert meta["dim"] == 32 + 6
    assert res["step"] == 48 and res["loss"] < res["first_epoch_loss"]
    cat = read_pandas(toy_lake, "catalog")
    ids, texts = cat["item_id"].tolist(), [render(r) for r in cat.to_dict("records")]

    def separation(model_dir):
        # the dense block alone: the shared words would separate the groups through the TF-IDF block
        # even if the encoder had learned nothing
        enc = load_encoder(model_dir, device="cpu")
        dense = enc.embed(texts)[:, : enc.hidden]
        vecs = dict(zip(ids, dense / np.linalg.norm(dense, axis=1, keepdims=True)))
        sims = _cos_by_group(vecs, vecs[COLD])
        return sims["A"] - sims["B"], enc

    trained, enc = separation(res["model_dir"])
    untrained, _ = separation(tiny_bert)
    # stage 2 = a distributed sparse x dense product over 2 workers: check it against numpy on the
    # export's own text vectors: e_i = id_beta (12, the default) * sum_j w_ij t_j / sum_j w_ij
    text_vec = dict(zip(ids, enc.embed(texts)))
    co = read_pandas(toy_lake, "cooccurrence")
    warm = sorted(set(co["item_a"]))
    want = []
    for i in warm:
        rows = co[co["item_a"] == i]
        w = rows["weight"].to_numpy()
        want.append(12.0 * (w[:, None] * np.stack([text_vec[j] for j in rows["item_b"]])).sum(0) / w.sum())
    np.testing.assert_allclose(enc.id_vectors(warm), np.stack(want), atol=1e-4)
    both = dict(zip(ids, enc.embed_items(ids, texts)))  # the served vectors: text + ID for warm items
    assert _cos_by_group(both, both[COLD])["A"] > _cos_by_group(both, both[COLD])["B"] + 0.1
    assert enc.has_vector(["A0", "B3"]).all() and not enc.has_vector([COLD]).any()  # cold: text alone
    assert trained > 0.1 and trained > untrained + 0.1
    top = neighbours_by_title(res["model_dir"], toy_lake, ["red apple fruit cold"], k=5)["red apple fruit cold"]
    assert len(top) == 5 and all(item.startswith("A") for item, _, _ in top)


def test_run_name_flag_matches_train_mlm(lake):
    import argparse

    from ray_train.items import COMMAND

    p = argparse.ArgumentParser()
    COMMAND.configure(p)
    for flag in ("--run-name", "--name"):  # --name: the old spelling stays an alias
        cfg = COMMAND.parse(p.parse_args(["--lake", lake, "--kind", "id", flag, "r1"]))
        assert cfg.name == "r1" and cfg.max_failures >= 1


def test_softmax_loss_matches_dense_reference():
    """CatalogSoftmax's sparse loss vs the formula written out densely in numpy on a random instance."""
    import torch

    from ray_train.items_softmax import CatalogSoftmax

    rng = np.random.default_rng(1)
    n, d_text, dim = 7, 5, 3
    text = rng.normal(size=(n, d_text)).astype(np.float32)
    model = CatalogSoftmax(torch.from_numpy(text), dim, torch.zeros(n), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    c = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    np.fill_diagonal(c, 0)
    rows = np.array([0, 2, 3, 6])
    keep_q, keep_c = np.array([1, 0, 1, 1.0]), (rng.random(n) < 0.5).astype(float)
    sub = c[rows]
    target = torch.tensor(sub, dtype=torch.float32).to_sparse()
    summed, mass = model(torch.from_numpy(rows), torch.tensor(keep_q, dtype=torch.float32),
                         torch.tensor(keep_c, dtype=torch.float32), target)  # fmt: skip
    P = {k: v.detach().numpy().astype(np.float64) for k, v in model.named_parameters()}
    q = text[rows] @ P["query_proj"] + P["query_id"][rows] * keep_q[:, None]
    cand = text @ P["cand_proj"] + P["cand_id"] * keep_c[:, None]
    s = q @ cand.T + text @ P["text_bias"] + P["bias"] * keep_c
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    want = (sub * (lse[:, None] - s)).sum()
    assert float(mass) == pytest.approx(sub.sum(), rel=1e-5)
    assert float(summed.detach()) == pytest.approx(want, rel=1e-4)


def _softmax_cfg(lake: str, init: str, workers: int, **kw):
    from ray_train.items import ItemsConfig

    return build_config(ItemsConfig, None, lake=lake, kind="softmax", init=init, dim=8, softmax_steps=kw.pop("steps", 40),
                        lr=0.05, workers=workers, run_name=f"softmax-w{workers}", restart=True, **kw)  # fmt: skip


def test_softmax_ddp_matches_single_process_and_ranks_by_dot(toy_lake, tiny_bert, ray_local):
    """2 DDP workers (each owning half the query rows) train exactly what 1 process trains; the
    export serves query / candidate vectors whose dot product ranks a group's own items first, for
    warm items and for the cold item (text alone)."""
    from common.lake import read_pandas
    from common.models import load_encoder, read_meta
    from common.scoring import SoftmaxHead, score
    from common.text import render
    from ray_train.items import neighbours_by_title, train_items

    # fp32: with bf16 logits each worker's partial gradient sums are rounded before DDP adds them, so
    # the two runs would agree only to bf16 precision (test_softmax_bf16_logits_track_fp32 covers that)
    one = train_items(_softmax_cfg(toy_lake, tiny_bert, 1, softmax_precision="fp32"))
    res = train_items(_softmax_cfg(toy_lake, tiny_bert, 2, softmax_precision="fp32"))
    h1, h2 = SoftmaxHead.load(one["model_dir"]), SoftmaxHead.load(res["model_dir"])
    for name in ("query_proj", "cand_proj", "text_bias", "query_id", "cand_id", "bias"):
        np.testing.assert_allclose(getattr(h2, name), getattr(h1, name), atol=5e-4, err_msg=name)
    assert res["loss"] == pytest.approx(one["loss"], rel=1e-3) and res["loss"] < res["first_epoch_loss"]

    meta = read_meta(res["model_dir"])
    # served: dim 8 + bias + popularity + the text-match block (all 38 text dims: [dense 32 | TF-IDF 6])
    assert meta["kind"] == "softmax" and meta["dim"] == 8 + 2 + (32 + 6) and meta["scoring"]["type"] == "dot"
    enc = load_encoder(res["model_dir"], device="cpu")
    cat = read_pandas(toy_lake, "catalog")
    ids, texts = cat["item_id"].tolist(), [render(r) for r in cat.to_dict("records")]
    q, c = enc.embed_pair(ids, texts)
    s = score(q, c)
    np.fill_diagonal(s, -np.inf)
    group = np.array([i[0] for i in ids])
    warm = [k for k, i in enumerate(ids) if i != COLD]
    for k in [*warm, ids.index(COLD)]:
        top = np.argsort(-s[k])[:5]
        assert (group[top] == ids[k][0]).all(), (ids[k], [ids[t] for t in top])
    assert not np.allclose(s[warm][:, warm], s[warm][:, warm].T, atol=1e-3)  # asymmetric: no cosine could give this
    top = neighbours_by_title(res["model_dir"], toy_lake, ["red apple fruit cold"], k=5)["red apple fruit cold"]
    assert len(top) == 5 and all(item.startswith("A") for item, _, _ in top)


def test_softmax_target_adds_the_customer_weights(toy_lake, tiny_bert, ray_local, tmp_path):
    """The softmax model's training rows: every session pair's weight plus customer_weight x its
    customer_cooccurrence weight (read back from the two tables with pandas); a lake without the
    customer table is refused with the fix, unless customer_weight is 0."""
    import shutil

    from common import lake as lk
    from ray_train.items import INPUT_TABLES, _datasets, train_items
    from ray_train.pairs import item_frequencies

    vocab = item_frequencies(toy_lake)
    idx = dict(zip(vocab["item_id"], vocab["idx"]))
    sessions = lk.read_pandas(toy_lake, "cooccurrence")
    customers = lk.read_pandas(toy_lake, "customer_cooccurrence")
    want = Counter()
    for frame, factor in ((sessions, 1.0), (customers, 2.5)):
        for a, b, w in zip(frame["item_a"], frame["item_b"], frame["weight"]):
            want[idx[a], idx[b]] += factor * w
    datasets, _ = _datasets(_softmax_cfg(toy_lake, tiny_bert, 1, customer_weight=2.5), vocab, None, lk.input_versions(toy_lake, INPUT_TABLES))
    got = datasets["cooc"].to_pandas().groupby(["a", "b"])["w"].sum()
    assert len(customers) > 0 and set(got.index) == set(want)
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-12), key

    bare = str(tmp_path / "bare")
    shutil.copytree(toy_lake, bare)
    shutil.rmtree(lk.table_uri(bare, "customer_cooccurrence"))
    with pytest.raises(Exception, match="customer_cooccurrence"):
        train_items(_softmax_cfg(bare, tiny_bert, 1))


def test_softmax_bf16_logits_track_fp32():
    """The bf16 logit product (fp32 accumulation, loss in fp32) gives the fp32 loss and gradients to
    bf16 precision, on a catalog-sized random problem; 'auto' is fp32 or bf16, never anything else."""
    import scipy.sparse as sp
    import torch

    from ray_train.items_softmax import CatalogSoftmax
    from ray_train.precision import compute_dtype

    rng = np.random.default_rng(0)
    n, rows = 300, np.arange(0, 300, 3)
    text = torch.from_numpy(rng.standard_normal((n, 24)).astype(np.float32))
    m = sp.random(len(rows), n, density=0.05, random_state=0, format="coo")
    target = torch.sparse_coo_tensor(np.vstack([m.row, m.col]), m.data.astype(np.float32), m.shape, check_invariants=True).coalesce()
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        model = CatalogSoftmax(text, 16, torch.zeros(n), seed=0, text_scale=2.0, logits_dtype=dt)
        summed, mass = model(torch.from_numpy(rows), torch.ones(len(rows)), torch.ones(n), target)
        (summed / mass).backward()
        out[dt] = (float((summed / mass).detach()), model.query_proj.grad.clone())
    (l32, g32), (l16, g16) = out[torch.float32], out[torch.bfloat16]
    assert l16 != l32 and abs(l16 - l32) < 1e-2 * abs(l32)  # the bf16 path ran, and it tracks fp32
    assert torch.linalg.norm(g16 - g32) < 0.05 * torch.linalg.norm(g32)
    assert compute_dtype("fp32", "cpu") == torch.float32 and compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        compute_dtype("fp16", "cpu")
