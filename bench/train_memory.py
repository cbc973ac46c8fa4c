"""A train worker's peak memory as the data grows: the whole shard in memory vs the streaming buffer.

The same records (expert demonstrations of the three environments, scored top-20 by the starter, as in
bench/train.py) are copied under new ids to 1x, 4x and 16x; a one-worker run of a few steps trains on each, once
holding its whole shard (`train.buffer_records 0`) and once streaming it through a buffer
(`train.buffer_records N`). The worker's peak resident memory (`peak_memory_gb`, ru_maxrss of the worker) is
read from each run's result. Goal: the buffered runs stay within 10% of each other from 1x to 16x.

    python bench/train_memory.py [--episodes 4 --unit 32 --scales 1,4,16 --buffer 64 --steps 4]

`--unit` copies of the scored demonstrations make 1x, so that at 16x the records, not the model, dominate a
worker's memory (at 32 records the whole shard is a few percent of it).

Results go to bench/results/train_memory.json (with the CPU model and precision) and train_memory.md, which
`--table` regenerates from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def replicate(src: Path, dst: Path, times: int) -> int:
    """`times` copies of every record under `src`, ids suffixed, one shard per copy; returns the record count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sad_ray.records import read_shard_table, shard_paths

    dst.mkdir(parents=True, exist_ok=True)
    tables = [read_shard_table(p) for p in shard_paths(src)]
    base = pa.concat_tables(tables)
    metadata = tables[0].schema.metadata
    for n in range(times):
        ids = pa.array([f"{i}/copy{n}" for i in base["id"].to_pylist()])
        copy = base.set_column(base.schema.get_field_index("id"), "id", ids).replace_schema_metadata(metadata)
        pq.write_table(copy, dst / f"part-{n:05d}.parquet", compression="zstd")
    return base.num_rows * times


def run(records: Path, student: Path, out: Path, steps: int, buffer: int) -> dict:
    from sad_ray.method.curriculum import CurriculumConfig
    from sad_ray.method.losses import LossConfig
    from sad_ray.train.ray_train import TrainConfig, train_on_records

    settings = TrainConfig(steps=steps, batch_size=1, grad_accum=2, checkpoint_every=steps, threads=2,
                           buffer_records=buffer)
    result = train_on_records(records, student, out, settings, LossConfig(), CurriculumConfig(c0=1.0, ramp=0.0),
                              run_name=f"memory-buffer{buffer}")
    return {"peak_memory_gb": result.peak_memory_gb, "peak_own_memory_gb": result.peak_own_memory_gb,
            "peak_shared_memory_gb": result.peak_shared_memory_gb, "seconds": result.seconds}


def table(results: dict) -> str:
    host = results["host"]
    buffer = results["buffer"]
    lines = [f"Train worker peak memory ({host.get('cpu_model', '?')}, precision {host.get('precision_resolved', '?')};"
             f" one worker, {results['steps']} steps, {results['base_records']} records at 1x)", "",
             f"| data | records | whole shard in memory | buffer of {buffer} | buffer of {buffer}: own pages | "
             f"buffer of {buffer}: shared-memory pages |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        full, buf = row["full"], row["buffered"]
        lines.append(f"| {row['scale']}x | {row['records']} | {full['peak_memory_gb']:.2f} GB | "
                     f"{buf['peak_memory_gb']:.2f} GB | {buf.get('peak_own_memory_gb', 0):.2f} GB | "
                     f"{buf.get('peak_shared_memory_gb', 0):.3f} GB |")

    def ratio(kind: str, key: str) -> float:
        values = [r[kind].get(key, 0.0) for r in results["rows"]]
        return max(values) / min(values) if min(values) else float("nan")

    lines += ["", f"Largest over smallest: whole shard {ratio('full', 'peak_memory_gb'):.2f}x, buffered "
                  f"{ratio('buffered', 'peak_memory_gb'):.2f}x (goal: buffered within 1.10x); the buffered worker's "
                  f"own pages {ratio('buffered', 'peak_own_memory_gb'):.2f}x.",
              "Peak resident memory is ru_maxrss; its two kinds are sampled every 0.1 s (sad_ray.train.step."
              "MemoryWatch): own pages (anonymous and file-backed) and shared-memory pages mapped (RssShmem: on a "
              "Ray worker, the object store's, which belong to the node's fixed-size store). A peak shorter than the "
              "sampling interval shows in ru_maxrss only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4, help="demonstrations per environment at 1x")
    parser.add_argument("--unit", type=int, default=32, help="copies of the demonstrations' records at 1x")
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--buffer", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--table", action="store_true", help="only regenerate the table from the stored JSON")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / "train_memory.json").read_text())))
        return

    from bench.train import make_records
    from sad_ray.models.student import build_student
    from sad_ray.precision import host_summary

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        starter = make_records(root / "base", args.episodes)
        student = build_student(starter, root / "student-init", 2).path
        rows = []
        for scale in (int(s) for s in args.scales.split(",")):
            records = root / f"x{scale}"
            n = replicate(root / "base" / "records", records, scale * args.unit)
            rows.append({"scale": scale, "records": n,
                         "full": run(records, student, root / f"out-full-{scale}", args.steps, 0),
                         "buffered": run(records, student, root / f"out-buf-{scale}", args.steps, args.buffer)})
            print(json.dumps(rows[-1]), flush=True)
        results = {"host": host_summary("auto", "cpu"), "steps": args.steps, "buffer": args.buffer,
                   "base_records": rows[0]["records"] // rows[0]["scale"], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_memory.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "train_memory.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
