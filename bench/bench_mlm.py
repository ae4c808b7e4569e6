"""Benchmark: MLM pretraining throughput.

CPU mode (default): tokens/s per worker of ``ray_train.mlm`` (Ray Train, 1 worker, Delta -> Ray Data,
length bucketing, masked-only vocabulary projection) for the tiny and small presets, beside a plain
single-process PyTorch loop on the same model and the same sequences (HF ``BertForMaskedLM(labels=...)``,
fixed order, pad-to-batch-max). Median of 3 runs each; the ratio is printed.

GPU mode (``--gpu``): the per-worker training step that Ray workers run (``ray_train.mlm.train_step``:
bf16 autocast, TF32, SDPA, fused AdamW, masked-only projection, packing to 128 tokens, optional
torch.compile) for the ``base`` preset at sequence length 128, without Ray (one GPU = one worker),
beside a plain fp32 PyTorch loop on the same model and data. Prints tokens/s and MFU =
6 * params * tokens/s / peak bf16 dense FLOP/s (989e12 for an H100 SXM; --peak-flops to change).

    python bench/bench_mlm.py                 # CPU
    python bench/bench_mlm.py --gpu --compile  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "online_retail" / "online_retail.parquet"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def titles(n: int) -> list[str]:
    import pyarrow.parquet as pq

    desc = pq.read_table(DATA, columns=["Description"]).column("Description").to_pandas().dropna().str.strip()
    return desc[desc.str.len() > 3].drop_duplicates().tolist()[:n]


def train_tokenizer(texts: list[str], vocab_size: int = 4000):
    """A real WordPiece tokenizer trained on the titles (what `prodrep tokenize` produces)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


# ------------------------------------------------------------------------------------------- plain
def plain_loop(model, seqs: list[np.ndarray], collator, batch_size: int, steps: int, device, warmup: int = 3,
               amp: bool = False, lr: float = 5e-4) -> float:  # fmt: skip
    """The obvious loop: HF forward with labels (vocabulary projection on every token), AdamW. tokens/s."""
    import torch

    from ray_train.data import pad_batch

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    n_tok, t0 = 0, None
    for i in range(warmup + steps):
        j = (i * batch_size) % max(1, len(seqs) - batch_size)
        chunk = seqs[j : j + batch_size]
        b = collator(chunk, gen)
        b = {k: v.to(device) for k, v in b.items()}
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n_tok = time.perf_counter(), 0
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tok += int(b["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_tok / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- CPU
def cpu_bench(args) -> None:
    import pyarrow as pa
    import torch

    from common import lake as lk
    from ray_train.cluster import ensure_ray
    from ray_train.data import MaskingCollator, SpecialTokens, pad_batch
    from ray_train.mlm import MLMConfig, build_model, train_mlm

    texts = titles(args.items)
    tok = train_tokenizer(texts)
    ids = tok(texts, truncation=True, max_length=64)["input_ids"]
    tmp = tempfile.mkdtemp(prefix="bench-mlm-")
    lake = f"{tmp}/lake"
    tok_dir = lk.artefact_dir(lake, "tokenizers", "bench")
    tok.save_pretrained(tok_dir)
    n = len(texts)
    lk.write_arrow(pa.table({
        "item_id": [f"i{i}" for i in range(n)], "text": texts, "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "n_tokens": pa.array([len(x) for x in ids], pa.int32()), "empty_text": [False] * n,
        "split": ["val" if i % 10 == 0 else "train" for i in range(n)], "shard": pa.array([i % 4 for i in range(n)], pa.int32()),
    }), lake, "text_shards", mode="overwrite", metadata={"tokenizer_dir": tok_dir, "tokenizer_hash": "bench",
                                                         "vocab_size": len(tok), "max_length": 64})  # fmt: skip
    ensure_ray(num_cpus=max(2, os.cpu_count() or 2))
    seqs = [np.asarray(x) for i, x in enumerate(ids) if i % 10]
    collator = MaskingCollator(SpecialTokens.from_tokenizer(tok))
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        ray_runs, plain_runs = [], []
        for r in range(args.repeats):
            cfg = MLMConfig(lake=lake, preset=preset, workers=1, cpus_per_worker=float(args.threads), max_steps=args.steps,
                            batch_size=args.batch_size, warmup_steps=2, eval_interval=10_000, checkpoint_interval=10_000,
                            log_interval=5, run_name=f"bench-{preset}-{r}", max_eval_rows=64)  # fmt: skip
            res = train_mlm(cfg)
            recs = [json.loads(x) for x in (Path(res["model_dir"]) / "metrics.jsonl").read_text().splitlines()]
            tps = [x["tokens_per_s_per_worker"] for x in recs if "tokens_per_s_per_worker" in x][1:]  # skip warm-up
            ray_runs.append(statistics.median(tps))
            torch.manual_seed(0)
            model = build_model(preset, len(tok), 64, tok.pad_token_id)
            plain_runs.append(plain_loop(model, seqs, collator, args.batch_size, args.plain_steps, torch.device("cpu")))
        rm, pm = statistics.median(ray_runs), statistics.median(plain_runs)
        rows.append((preset, rm, pm, rm / pm))
        print(f"{preset:6s} ray_train.mlm {rm:9.0f} tok/s/worker | plain loop {pm:9.0f} tok/s | ratio {rm / pm:.2f}x "
              f"(runs: ray {[round(x) for x in ray_runs]}, plain {[round(x) for x in plain_runs]})", flush=True)  # fmt: skip
    print(json.dumps({"mode": "cpu", "threads": args.threads, "batch_size": args.batch_size,
                      "results": [dict(zip(("preset", "ray_tok_s_per_worker", "plain_tok_s", "ratio"), r)) for r in rows]}))  # fmt: skip


# ------------------------------------------------------------------------------------------- GPU
def gpu_bench(args) -> None:
    import torch

    from ray_train.data import MaskingCollator, SpecialTokens
    from ray_train.losses import MaskedLMLoss
    from ray_train.mlm import build_model, train_step
    from ray_train.optim import build_optimizer, build_scheduler

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here (use --device cpu --preset tiny for a smoke run)")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    texts = titles(args.items)
    tok = train_tokenizer(texts, vocab_size=8000)
    ids = [np.asarray(x) for x in tok(texts, truncation=True, max_length=64)["input_ids"]]
    # real titles packed into rows of exactly seq_len tokens (no padding; items may straddle rows here)
    flat = np.concatenate(ids * 20)
    packed = [flat[i : i + args.seq_len] for i in range(0, len(flat) - args.seq_len, args.seq_len)]
    collator = MaskingCollator(SpecialTokens.from_tokenizer(tok), pad_multiple=args.seq_len)
    vocab = 30522  # BERT-base's vocabulary, so FLOPs/params match the public BERT-base anchors
    gen = torch.Generator().manual_seed(0)
    bs = args.batch_size
    batches = [collator(packed[j : j + bs], gen) for j in range(0, len(packed) - bs, bs)][:64]
    if dev.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device: {dev_name}, torch {torch.__version__}; preset {args.preset}, batch {bs} x {args.seq_len} tokens", flush=True)

    def n_params(m) -> tuple[int, int]:
        total = sum(p.numel() for p in m.parameters())
        emb = sum(p.numel() for n, p in m.named_parameters() if "embeddings" in n)
        return total, total - emb

    def ours(compile_: bool) -> list[float]:
        """tokens/s of ``repeats`` timed windows on one model: built (and compiled) once, warmed up once."""
        torch.manual_seed(0)
        mlm = build_model(args.preset, vocab, args.seq_len, tok.pad_token_id).to(dev)
        if compile_:
            mlm.bert.compile(dynamic=False)
        module = MaskedLMLoss(mlm)
        opt = build_optimizer(mlm, 1e-4)
        sch = build_scheduler(opt, 10, 10_000)
        runs, i = [], 0
        for _ in range(args.warmup):
            train_step(module, opt, sch, [batches[i % len(batches)]], dev, 1.0)
            i += 1
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(module, opt, sch, [batches[i % len(batches)]], dev, 1.0)
                i += 1
            sync()
            runs.append(args.steps * bs * args.seq_len / (time.perf_counter() - t0))
        return runs

    def plain(amp: bool) -> float:
        torch.backends.cuda.matmul.allow_tf32 = amp  # the plain fp32 loop runs true fp32
        torch.manual_seed(0)
        model = build_model(args.preset, vocab, args.seq_len, tok.pad_token_id)
        sq = [packed[i] for i in range(len(packed))]
        r = plain_loop(model, sq, collator, bs, args.steps, dev, warmup=args.warmup, amp=amp, lr=1e-4)
        torch.backends.cuda.matmul.allow_tf32 = True
        return r

    probe = build_model(args.preset, vocab, args.seq_len, tok.pad_token_id)
    total, non_emb = n_params(probe)
    del probe
    def repeated(fn):
        return lambda: [fn() for _ in range(args.repeats)]

    modes = {"plain fp32 (HF forward, all-token head)": repeated(lambda: plain(False)),
             **({"plain bf16 autocast (HF forward)": repeated(lambda: plain(True))} if args.device == "cuda" else {}),
             "ray_train.mlm step (bf16, fused AdamW, masked-only head)": lambda: ours(False)}  # fmt: skip
    if args.compile:
        modes["ray_train.mlm step + torch.compile"] = lambda: ours(True)
    out = {}
    for name, fn in modes.items():
        runs = fn()
        med = statistics.median(runs)
        mfu = 6 * total * med / args.peak_flops
        mfu_ne = 6 * non_emb * med / args.peak_flops
        out[name] = {"tok_s": med, "mfu": mfu, "mfu_non_embedding": mfu_ne, "runs": runs}
        print(f"{name:58s} {med:10.0f} tok/s  MFU {100 * mfu:5.1f}% (non-embedding params: {100 * mfu_ne:5.1f}%)  runs {[round(r) for r in runs]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base_name = next(iter(modes))
    best = max(out, key=lambda k: out[k]["tok_s"])
    print(f"speed-up of '{best}' over '{base_name}': {out[best]['tok_s'] / out[base_name]['tok_s']:.2f}x")
    print(json.dumps({"mode": "gpu", "device": dev_name, "preset": args.preset, "params": total, "non_embedding_params": non_emb, "seq_len": args.seq_len,
                      "batch_size": bs, "peak_flops": args.peak_flops, "results": out}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode (base preset, seq len 128, MFU)")
    p.add_argument("--compile", action="store_true", help="GPU mode: also time torch.compile")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--plain-steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads per worker / plain loop")
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--preset", default="base", help="GPU mode: model preset (base)")
    p.add_argument("--device", default="cuda", help="GPU mode: torch device (cpu only for a smoke run)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense bf16 FLOP/s (H100 SXM: 989e12)")
    args = p.parse_args()
    if args.gpu:
        args.steps = args.steps or 50
        args.batch_size = args.batch_size or 128
        gpu_bench(args)
    else:
        args.steps = args.steps or 60
        args.batch_size = args.batch_size or 64
        cpu_bench(args)


if __name__ == "__main__":
    main()
