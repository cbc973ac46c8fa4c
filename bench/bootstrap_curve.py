"""The bootstrap's learning curve: held-out success of every checkpoint a bootstrap run kept.

    python bench/bootstrap_curve.py --config configs/default.yaml [key=value ...] [--tasks 40,0,0] [--max-steps 30]

Run it after `jobs/bootstrap_teacher.py` with the same config and overrides, with `bootstrap.train.keep_checkpoints`
high enough to keep the checkpoints you want measured. Each checkpoint's weights become a Hugging Face folder next
to the results (`curve/model-step-<n>/`, delete them after), are played greedily on the held-out tasks with vLLM like the bootstrap's own evaluation, and the
result is stored in `<cache_dir>/teachers/<name>.work/<settings>/curve/step-<n>.json` (a rerun skips measured
steps); `curve.md` is regenerated from those files (`--publish DIR` copies both into the repository, `--table DIR`
regenerates a published table). Timings are on this machine: its CPU and precision are in the table's heading.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sad_ray.config import Config, load_config  # noqa: E402

log = logging.getLogger("bootstrap_curve")


def checkpoints(work: Path) -> dict[int, Path]:
    """Step -> checkpoint folder of the bootstrap run(s) under `work/ray_train`."""
    out = {}
    for progress in work.glob("ray_train/*/checkpoint_*/progress.json"):
        out[int(json.loads(progress.read_text())["step"])] = progress.parent
    return dict(sorted(out.items()))


def as_hf(checkpoint: Path, base: Path, target: Path) -> Path:
    """The checkpoint's model weights as a Hugging Face folder at `target` (the final checkpoint has its own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sad_ray.train.ray_train import HF_SUBDIR

    if (checkpoint / HF_SUBDIR / "config.json").is_file():
        return checkpoint / HF_SUBDIR
    state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")["model"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base).save_pretrained(target)
    return target


def measure(cfg: Config, tasks_per_env: tuple[int, ...], max_steps: int | None,
            only: set[int] | None = None) -> Path:
    from sad_ray.bootstrap import env_tasks, settings_hash, teacher_home
    from sad_ray.eval.agent_eval import evaluate_agent
    from sad_ray.models.starter import resolve_model
    from sad_ray.precision import host_summary
    from sad_ray.stages import env_kwargs

    work = teacher_home(cfg).parent / f"{cfg.bootstrap.name}.work" / settings_hash(cfg)
    found = checkpoints(work)
    if not found:
        raise SystemExit(f"no checkpoints under {work}/ray_train: run jobs/bootstrap_teacher.py with this config")
    curve = work / "curve"
    curve.mkdir(exist_ok=True)
    base = resolve_model(cfg.bootstrap.base, Path(cfg.paths.cache_dir).expanduser())
    tasks = env_tasks(cfg, "test", tasks_per_env)
    for step, checkpoint in found.items():
        out = curve / f"step-{step}.json"
        if out.is_file() or (only and step not in only):
            continue
        model = as_hf(checkpoint, base, curve / f"model-step-{step}")
        report = evaluate_agent(model, tasks, cfg.bootstrap.eval_engine, max_new_tokens=cfg.bootstrap.eval_max_new_tokens,
                                max_in_flight=cfg.bootstrap.eval_in_flight, max_steps=max_steps,
                                context_chars=cfg.rollout.context_chars, env_kwargs=env_kwargs(cfg),
                                precision=cfg.precision)
        by_type: dict[str, list[int]] = {}
        for ep in report.episodes:
            by_type.setdefault(f"{ep.env}/{ep.task_type}", [0, 0])
            by_type[f"{ep.env}/{ep.task_type}"][0] += int(ep.success)
            by_type[f"{ep.env}/{ep.task_type}"][1] += 1
        trained = json.loads((checkpoint / "progress.json").read_text())
        out.write_text(json.dumps({
            "step": step, "loss": trained.get("loss"), "train_seconds": trained.get("seconds"),
            "won": sum(e.success for e in report.episodes), "played": len(report.episodes), "by_type": by_type,
            "eval_seconds": report.seconds, "max_steps": max_steps,
            "max_new_tokens": cfg.bootstrap.eval_max_new_tokens, "host": host_summary(cfg.precision, "cpu"),
        }, indent=2))
        log.info("step %d: %d/%d won", step, sum(e.success for e in report.episodes), len(report.episodes))
    return write_table(curve)


def write_table(curve: Path) -> Path:
    rows = [json.loads(p.read_text()) for p in sorted(curve.glob("step-*.json"), key=lambda p: int(p.stem[5:]))]
    host = rows[0]["host"]
    lines = [f"Bootstrap learning curve ({host.get('cpu_model', '?')}, precision {host.get('precision_resolved', '?')}; "
             f"held-out, greedy, step limit {rows[0]['max_steps']}, up to {rows[0].get('max_new_tokens', 100)} new "
             f"tokens a turn)", "",
             "| step | train time | loss | won | success | by type |", "|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{t.split('/')[-1]} {w}/{n}" for t, (w, n) in sorted(r["by_type"].items()))
        lines.append(f"| {r['step']} | {r['train_seconds'] / 60:.1f} min | {r['loss']:.3f} | {r['won']}/{r['played']} "
                     f"| {r['won'] / r['played']:.0%} | {types} |")
    (curve / "curve.md").write_text("\n".join(lines) + "\n")
    return curve / "curve.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--tasks", default="40,0,0", help="held-out tasks per env of bootstrap.envs")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--steps", default="", help="measure only these checkpoints (e.g. 20,40); default all kept")
    parser.add_argument("--publish", default=None, help="also copy the results and table into this folder (e.g. "
                        "bench/results/bootstrap-curve/<name>, committed with the code that produced them)")
    parser.add_argument("--table", default=None, help="only regenerate curve.md from the step-*.json in this folder")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.table:
        print(write_table(Path(args.table)).read_text())
        return
    cfg = load_config(args.config, args.overrides)
    table = measure(cfg, tuple(int(n) for n in args.tasks.split(",")), args.max_steps,
                    {int(n) for n in args.steps.split(",") if n} or None)
    if args.publish:
        import shutil

        target = Path(args.publish)
        target.mkdir(parents=True, exist_ok=True)
        for result in table.parent.glob("step-*.json"):
            shutil.copy2(result, target / result.name)
        table = write_table(target)
    print(table.read_text())


if __name__ == "__main__":
    main()
