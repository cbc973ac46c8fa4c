"""Bytes per supervised token in a trajectory-record shard vs storing the teacher's full fp16 distribution.

Real records: the starter teacher scores seed trajectories (`python bench/record_size.py [--episodes N] [--k K]`).
The full-distribution side is measured too, not only computed: the same positions' fp16 distributions written
to Parquet with the same compression.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    from transformers import AutoTokenizer

    from sad_ray.envs.seed import seed_episodes
    from sad_ray.models.starter import provision_starter
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.records import write_shard
    from sad_ray.rollout.engines import HFEngine
    from sad_ray.rollout.score import score_episodes

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--full-positions", type=int, default=256, help="positions stored with the full fp16 row")
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = provision_starter(Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    engine = HFEngine(teacher)
    episodes = seed_episodes(args.episodes)
    records = list(score_episodes(episodes, tokenizer, engine, fmt="react", top_k=args.k,
                                  fingerprint=tokenizer_fingerprint(tokenizer)))
    n_sup = sum(int(r.supervised.sum()) for r in records)
    vocab = engine.model.config.vocab_size

    with tempfile.TemporaryDirectory() as tmp:
        shard = write_shard(records, Path(tmp) / "part-00000.parquet")
        shard_bytes = shard.stat().st_size
        # The teacher-distribution columns alone, which is what grows with k.
        dist = pq.read_table(shard, columns=["topk_ids", "topk_logprobs", "tail_logprob"])
        pq.write_table(dist, Path(tmp) / "dist.parquet", compression="zstd")
        dist_bytes = (Path(tmp) / "dist.parquet").stat().st_size

        # Full fp16 distributions of the first positions of the first record, same compression.
        r = records[0]
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.as_tensor(r.input_ids[None], dtype=torch.long)).logits[0, :-1]
        rows = torch.log_softmax(logits[torch.as_tensor(r.supervised[1:])].float(), -1)[: args.full_positions]
        full = rows.exp().half().numpy()
        table = pa.table({"probs": pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), vocab)})
        pq.write_table(table, Path(tmp) / "full.parquet", compression="zstd")
        full_bytes_per_token = (Path(tmp) / "full.parquet").stat().st_size / len(full)

    raw_full = vocab * 2
    per_token = shard_bytes / n_sup
    per_token_dist = dist_bytes / n_sup
    print(f"records: {len(records)}  supervised tokens: {n_sup}  top_k: {args.k}  vocab: {vocab}")
    print(f"shard (whole record)            {per_token:10.1f} bytes / supervised token")
    print(f"shard (teacher columns only)    {per_token_dist:10.1f} bytes / supervised token")
    print(f"full fp16 distribution, raw     {raw_full:10.1f} bytes / supervised token")
    print(f"full fp16 distribution, zstd    {full_bytes_per_token:10.1f} bytes / supervised token "
          f"(measured on {len(full)} positions)")
    print(f"ratio full-raw / shard          {raw_full / per_token:10.1f}x")
    print(f"ratio full-zstd / shard         {full_bytes_per_token / per_token:10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
