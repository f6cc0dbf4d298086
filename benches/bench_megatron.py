"""Megatron legacy TP=2 x PP=2 checkpoint -> HF safetensors: fastckpt vs the torch path vs cp -r.

Standalone script (not collected by pytest)::

    python benches/bench_megatron.py [--out DIR] [--layers 14] [--rounds 1]

The checkpoint is a Llama-shaped bf16 model (hidden 2048, ffn 5632, 16 heads, 4 query groups,
vocab 32000; ~1.5 GB at 14 layers) written with ``torch.save`` in Megatron's legacy layout
(``iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt`` with an ``args`` Namespace): the same
containers and TP shard geometry megatron-core writes (see ``tests/test_megatron.py`` for the real
ones), made without megatron-core so it can be large. Each tool runs in its own process after
``rm -rf`` of its output and ``sync``; reported: wall seconds, GB/s of tensor bytes, peak RssAnon
of the process tree (polled every 20 ms).

The reference path loads every rank file with ``torch.load``, concatenates the TP shards, splits
QKV per query group and fc1 into gate/up, trims nothing (vocab unpadded) and ``save_file``\\ s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

H, FFN, NH, NG, VOCAB, TP, PP = 2048, 5632, 16, 4, 32000, 2, 2
HD = H // NH

REFERENCE = r"""
import sys, torch, collections
from safetensors.torch import save_file
src, dst, L, H, FFN, NH, NG = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
TP, PP, HD = 2, 2, H // NH
qpg = NH // NG
ranks = {(t, p): torch.load(f"{src}/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt",
                            weights_only=False)["model"] for t in range(TP) for p in range(PP)}
per = L // PP
out = {}
for p in range(PP):
    shards = [ranks[(t, p)] for t in range(TP)]
    for key in shards[0]:
        if key.endswith("_extra_state"):
            continue
        parts = [s[key] for s in shards]
        if key.startswith("decoder.layers."):
            i, rest = key[len("decoder.layers."):].split(".", 1)
            pre = f"model.layers.{int(i) + p * per}."
            if rest == "self_attention.linear_qkv.weight":
                w = torch.cat(parts).view(NG, qpg + 2, HD, H)
                out[pre + "self_attn.q_proj.weight"] = w[:, :qpg].reshape(-1, H).clone()
                out[pre + "self_attn.k_proj.weight"] = w[:, qpg].reshape(-1, H).clone()
                out[pre + "self_attn.v_proj.weight"] = w[:, qpg + 1].reshape(-1, H).clone()
            elif rest == "mlp.linear_fc1.weight":
                halves = [x.chunk(2) for x in parts]
                out[pre + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
                out[pre + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
            elif rest == "self_attention.linear_proj.weight":
                out[pre + "self_attn.o_proj.weight"] = torch.cat(parts, dim=1)
            elif rest == "mlp.linear_fc2.weight":
                out[pre + "mlp.down_proj.weight"] = torch.cat(parts, dim=1)
            elif rest == "input_layernorm.weight":
                out[pre + "input_layernorm.weight"] = parts[0].clone()
            elif rest == "pre_mlp_layernorm.weight":
                out[pre + "post_attention_layernorm.weight"] = parts[0].clone()
        elif key == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = torch.cat(parts)
        elif key == "output_layer.weight":
            out["lm_head.weight"] = torch.cat(parts)
        elif key == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = parts[0].clone()
import os
os.makedirs(dst, exist_ok=True)
save_file(out, f"{dst}/model.safetensors", metadata={"format": "pt"})
"""

FASTCKPT = r"""
import sys, fastckpt
r = fastckpt.convert(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], overwrite=True,
                     fsync=False)  # warm, like cp -r and the torch path (neither fsyncs)
print(r.nbytes)
"""


def make(root: Path, layers: int) -> Path:
    src = root / f"megatron_tp2pp2_l{layers}"
    if (src / "latest_checkpointed_iteration.txt").exists():
        return src / "iter_0000001"
    import argparse as ap

    import torch

    torch.manual_seed(0)
    qpg = NH // NG
    per = layers // PP
    args = ap.Namespace(num_layers=layers, hidden_size=H, ffn_hidden_size=FFN,
                        num_attention_heads=NH, group_query_attention=True, num_query_groups=NG,
                        kv_channels=HD, swiglu=True, padded_vocab_size=VOCAB,
                        untie_embeddings_and_output_weights=True, tensor_model_parallel_size=TP,
                        pipeline_model_parallel_size=PP, normalization="RMSNorm",
                        params_dtype=torch.bfloat16, bf16=True)  # fmt: skip

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05)

    for t in range(TP):
        for p in range(PP):
            sd: dict[str, torch.Tensor] = {}
            if p == 0:
                sd["embedding.word_embeddings.weight"] = rnd(VOCAB // TP, H)
            for i in range(per):
                pre = f"decoder.layers.{i}."
                sd[pre + "input_layernorm.weight"] = rnd(H)
                sd[pre + "self_attention.linear_qkv.weight"] = rnd(NG // TP * (qpg + 2) * HD, H)
                sd[pre + "self_attention.linear_proj.weight"] = rnd(H, NH * HD // TP)
                sd[pre + "pre_mlp_layernorm.weight"] = rnd(H)
                sd[pre + "mlp.linear_fc1.weight"] = rnd(2 * FFN // TP, H)
                sd[pre + "mlp.linear_fc2.weight"] = rnd(H, FFN // TP)
            if p == PP - 1:
                sd["decoder.final_layernorm.weight"] = rnd(H)
                sd["output_layer.weight"] = rnd(VOCAB // TP, H)
            d = src / "iter_0000001" / f"mp_rank_{t:02d}_{p:03d}"
            d.mkdir(parents=True, exist_ok=True)
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": sd}
            torch.save(state, d / "model_optim_rng.pt")
    (src / "latest_checkpointed_iteration.txt").write_text("1")
    return src / "iter_0000001"


def _rss_anon(pid: int) -> int:
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return total


def timed(cmd: list[str]) -> tuple[float, int, str]:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=poll)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return wall, peak, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "bench-data"))
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-torch", action="store_true")
    a = parser.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    src = make(root, a.layers)
    nbytes = sum(f.stat().st_size for f in src.rglob("*.pt"))
    print(f"source: {src} ({nbytes / 1e9:.2f} GB in {TP * PP} rank files)")
    tools = {
        "cp -r": ["cp", "-r", str(src), str(root / "out_cp")],
        # one file, as the torch path writes (the byte-identity check), and 500 MB shards
        "fastckpt": [sys.executable, "-c", FASTCKPT, str(src), str(root / "out_fastckpt"),
                     "100GB"],
        "fck-500MB": [sys.executable, "-c", FASTCKPT, str(src), str(root / "out_fastckpt_500"),
                      "500MB"],
    }  # fmt: skip
    if not a.skip_torch:
        tools["torch"] = [sys.executable, "-c", REFERENCE, str(src), str(root / "out_torch"),
                          str(a.layers), str(H), str(FFN), str(NH), str(NG)]  # fmt: skip
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in tools}
    for _ in range(a.rounds):
        for name, cmd in tools.items():
            out = Path(cmd[-1] if name == "cp -r" else cmd[4])  # the output folder
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, _ = timed(cmd)
            results[name].append((wall, peak))
    cp_wall = sorted(w for w, _ in results["cp -r"])[len(results["cp -r"]) // 2]
    for name, runs in results.items():
        runs.sort()
        wall, peak = runs[len(runs) // 2]
        print(f"{name:9s} wall {wall:7.2f} s  {wall / cp_wall:5.2f}x cp  "
              f"{nbytes / wall / 1e9:6.2f} GB/s  peak RssAnon {peak / 2**20:8.1f} MiB")  # fmt: skip
    if not a.skip_torch:
        same = (root / "out_torch" / "model.safetensors").read_bytes() == (
            root / "out_fastckpt" / "model.safetensors"
        ).read_bytes()
        print(f"fastckpt output byte-identical to the torch path: {same}")


if __name__ == "__main__":
    main()
