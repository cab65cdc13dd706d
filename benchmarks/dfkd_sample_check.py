"""Is it the samples or the student? Distill a fresh student from real images and from a run's frozen generator.

Takes a finished ``fedkd dfkd`` run directory (``synthesizer.name = generator``, with a
checkpoint) and trains a fresh student of the run's architecture, with the run's KD loss,
student optimizer (SGD lr / momentum / weight decay) and batch size, for ``--steps`` steps on:

- ``real``: random batches of the real training images, labelled only by the teacher's logits
  (the same loss as the run, so an upper bound for what pseudo-samples could teach);
- ``frozen``: fresh batches of the run's *final* generator, frozen (no adversarial game), made
  as the run makes the student's batches (the generator in train mode).

It prints the test accuracy every quarter of the steps and, at the end, the KD loss between
student and teacher on real test images. If ``real`` reaches the teacher and ``frozen`` stays
near the run's own student, the student and the loss are fine and the samples limit the run; if
``frozen`` is far above the run, the adversarial dynamics do. ::

    python benchmarks/dfkd_sample_check.py sims/results/dfkd-pairs/dfad-bn-glr/mnist5k-resnet8-mlp/seed0

The run's teacher is loaded as the run loaded it (its ``dfkd.teacher-cache`` or the run
directory's parent); nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedkd import checkpoint as ckpt  # noqa: E402
from fedkd import dfkd  # noqa: E402
from fedkd.config import load_config  # noqa: E402
from fedkd.errors import UserError  # noqa: E402
from fedkd.train import evaluate  # noqa: E402


def check(run_dir: Path, steps: int, sources: list[str]) -> str:
    cfg = load_config(run_dir / "config.toml", ["dfkd.threads=1"])
    if cfg.str("synthesizer.name") != "generator":
        raise UserError(f"{run_dir}: synthesizer.name is {cfg.str('synthesizer.name')!r}; this check needs 'generator'")
    points = sorted(run_dir.glob("checkpoint-*.pt"))
    if not points:
        raise UserError(f"{run_dir}: no checkpoint-*.pt (the frozen generator is read from the last one)")
    plan = dfkd.prepare(cfg)
    info = dfkd.obtain_teacher(plan, dfkd.cache_dir(cfg, run_dir))
    if info.source == "trained":
        raise UserError(f"{run_dir}: its teacher is not in the cache any more (this check would train another)")
    plan.synthesizer.load_state_dict(ckpt.read(points[-1])["synthesizer"])
    ds, teacher, dev = plan.dataset, plan.teacher, plan.device
    loss_fn = plan.updater.loss_fn  # the run's KD loss
    bs, eval_bs = cfg.int("synthesis.batch-size"), cfg.int("eval.batch-size")
    init = {k: v.clone() for k, v in plan.student.state_dict().items()}
    lines = [f"run {run_dir}: teacher {cfg.str('dfkd.teacher')} {info.accuracy:.4f}, student {cfg.str('dfkd.student')}, "
             f"loss {cfg.str('distill.loss')}, lr {cfg.float('distill.lr')}, batch {bs}, {steps} steps"]  # fmt: skip
    for source in sources:
        student = plan.student
        student.load_state_dict(init)
        student.train()
        opt = dfkd.student_optimizer(cfg, student)
        rng = torch.Generator().manual_seed(cfg.int("seed"))
        draw = plan.synthesizer.source("train")
        for step in range(1, steps + 1):
            if source == "real":
                x = ds.x_train[torch.randint(len(ds.x_train), (bs,), generator=rng)].to(dev)
            else:
                x, _ = draw()
            with torch.no_grad():
                target = teacher(x)
            loss = loss_fn(student(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % max(1, steps // 4) == 0 or step == steps:
                _, acc = evaluate(student, ds.x_test, ds.y_test, eval_bs, dev)
                student.train()
                lines.append(f"  {source:6s} step {step:5d}  train kd {float(loss.detach()):.3f}  test acc {acc:.4f}")
        student.eval()
        with torch.no_grad():
            x = ds.x_test[:eval_bs].to(dev)
            test_kd = float(loss_fn(student(x), teacher(x)))
        lines.append(f"  {source:6s} final test acc {acc:.4f} ({acc / info.accuracy:.1%} of the teacher), "
                     f"kd on real test images {test_kd:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished fedkd dfkd run directory (synthesizer.name = generator)")
    p.add_argument("--steps", type=int, default=2000, help="student steps per source (default 2000)")
    p.add_argument("--sources", default="real,frozen", help="comma-separated: real, frozen (default both)")
    args = p.parse_args(argv)
    try:
        sources = [s.strip() for s in args.sources.split(",")]
        bad = [s for s in sources if s not in ("real", "frozen")]
        if bad:
            raise UserError(f"--sources: unknown {', '.join(bad)}; valid: real, frozen")
        if args.steps < 1:
            raise UserError(f"--steps must be ≥ 1, got {args.steps}")
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir}: no config.toml (not a fedkd dfkd run directory)")
        print(check(run_dir, args.steps, sources), end="", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
