"""Faithfulness of attributions: the paper's table 1 / A.1-A.3 experiments on tasks trained here.

For every task (a model trained on this machine on data whose evidence is known, see
``benchmarks/tasks``) and every attribution method (each dynamiclrp preset, Captum's gradient
and perturbation baselines, Zennit composites for CNNs, LxT in its own process for Hugging Face
transformers, a random ranking) it measures:

* perturbation curves: MoRF / LeRF of the per-sample probability (or score) of the explained
  class, their AUCs on a normalised x-axis, ABPC = AUC(LeRF) - AUC(MoRF), comprehensiveness and
  sufficiency (``dynamiclrp.evaluation.perturbation``);
* localisation against the known evidence: relevance mass accuracy, relevance rank accuracy,
  pointing game (``dynamiclrp.evaluation.localisation``);
* extractive QA: top-1 / top-2 attributed context token inside the predicted span (TPS) and the
  gold span (TGS), IoU (``dynamiclrp.evaluation.qa``);
* cost: examples per second and peak memory of the attribution itself;

and writes ``docs/results/faithfulness.md`` (tables shaped like the paper's) and MoRF / LeRF plots.

Run from the repository root::

    python benchmarks/faithfulness.py --quick          # small subsets, minutes (CI)
    python benchmarks/faithfulness.py --full           # every task and method
    python benchmarks/faithfulness.py --tasks digits-vgg --methods dynamiclrp:gamma,saliency

Trained models are cached under ``$DYNAMICLRP_CACHE`` (default ``~/.cache/dynamiclrp``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from _measure import peak_memory  # noqa: E402

from dynamiclrp import PRESETS  # noqa: E402
from dynamiclrp.evaluation import localisation, perturbation, qa, sanity  # noqa: E402
from dynamiclrp.evaluation.methods import LXT_FAMILIES, make_method  # noqa: E402
from dynamiclrp.evaluation.task import Problem, Task, feature_relevance  # noqa: E402

OUR_PRESETS = [f"dynamiclrp:{name}" for name in PRESETS]
GRADIENT_BASELINES = [
    "saliency",
    "inputxgradient",
    "integrated_gradients",
    "gradientshap",
    "smoothgrad",
    "occlusion",
    "random",
]
# Zennit's canonizers know torchvision's residual blocks, not ours: only the plain CNN.
ZENNIT_TASKS = {"digits-vgg", "vgg16-imagenette"}
ZENNIT = ["zennit:epsilon_plus", "zennit:epsilon_gamma_box", "zennit:epsilon_alpha2_beta1"]
LXT_OUTPUTS = ("logits", "last", "span")  # what the LxT worker can rebuild
QUICK_PRESETS = ["dynamiclrp:dynamiclrp", "dynamiclrp:epsilon", "dynamiclrp:gamma"]
QUICK_BASELINES = ["saliency", "inputxgradient", "integrated_gradients", "random"]


def all_tasks() -> dict:
    """name -> builder ``(quick, n_eval) -> Task`` of every task in ``benchmarks/tasks``."""
    from tasks.text import TEXT_TASKS
    from tasks.vision import VISION_TASKS

    return {**VISION_TASKS, **TEXT_TASKS}


def methods_for(task: Task, args) -> list[str]:
    """The method names that apply to ``task``: Zennit only on CNNs, LxT only on HF models."""
    if args.methods:
        return args.methods.split(",")
    names = (QUICK_PRESETS + QUICK_BASELINES) if args.quick else (OUR_PRESETS + GRADIENT_BASELINES)
    if task.name in ZENNIT_TASKS and not args.quick:
        names += ZENNIT
    if task.hf is not None and args.lxt_python and task.hf.get("output") in LXT_OUTPUTS:
        family = getattr(task.hf["model"].config, "model_type", None)
        names += [f"lxt:{variant}" for variant in LXT_FAMILIES.get(family, ())]
    return names


@dataclass
class Row:
    """One method on one task: the metric means and the cost."""

    task: str
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    curves: tuple | None = None  # (fractions, mean MoRF, mean LeRF)
    error: str | None = None


def score_fn(task: Task):
    """Per-sample score of the explained class: softmax probability, or the raw score."""

    def score(inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = task.forward(task.to_x(inputs), idx)
            if task.score == "probability":
                out = out.softmax(-1)
            return out.gather(1, task.targets[idx].view(-1, 1)).squeeze(1)

    return score


def attribute(task: Task, method, batch_size: int) -> tuple[torch.Tensor, float, int]:
    """Feature relevance of every sample, with examples per second and peak memory (bytes)."""
    chunks, seconds, peak = [], 0.0, 0
    problems = [
        task.problem(torch.arange(start, min(start + batch_size, len(task))))
        for start in range(0, len(task), batch_size)
    ]
    if hasattr(method, "prepare"):  # LxT: one worker process for the whole task
        t0 = time.perf_counter()
        method.prepare(problems)
        seconds += time.perf_counter() - t0
        peak = math.nan  # spent in the worker process: not measured here
    for problem in problems:
        t0 = time.perf_counter()
        rel, bytes_ = peak_memory(lambda p=problem: method(p))
        seconds += time.perf_counter() - t0
        peak = max(peak, bytes_)
        if rel.shape != problem.x.shape:
            raise RuntimeError(
                f"method {method.name} returned shape {tuple(rel.shape)} for x of shape "
                f"{tuple(problem.x.shape)} on task {task.name}"
            )
        chunks.append(feature_relevance(rel.detach().float(), task.kind))
    return torch.cat(chunks), len(task) / seconds, peak


def evaluate(task: Task, name: str, args) -> Row:
    """All metrics of one method on one task."""
    row = Row(task.name, name)
    method = make_method(name, **method_kwargs(name, args))
    rel, per_second, peak = attribute(task, method, args.batch_size)
    m = row.metrics
    m["examples/s"] = per_second
    m["peak MiB"] = peak / 2**20
    if task.kind == "image":
        res = perturbation.image_perturbation(
            score_fn(task),
            task.inputs,
            rel,
            patch=task.patch,
            steps=args.steps,
            replacement=replacement(task, args),
            blur_kernel=blur_kernel(task),
            blur_sigma=blur_sigma(task),
            batch_size=args.eval_batch_size,
            progress=args.progress,
        )
    elif task.spans is None:
        res = perturbation.token_perturbation(
            score_fn(task),
            task.inputs,
            rel,
            replacement_id=task.replacement_id,
            rankable=task.rankable,
            steps=args.steps,
            batch_size=args.eval_batch_size,
            progress=args.progress,
        )
    else:
        res = None
    if res is not None:
        s = res.summary()
        for key in ("abpc", "comprehensiveness", "sufficiency", "auc_morf", "auc_lerf"):
            m[key] = float(s[key])
        m["abpc_se"] = float(s["abpc_se"])
        row.curves = (res.fractions, res.morf.mean(0), res.lerf.mean(0))
    if task.evidence is not None:
        # question tokens never count for an answer; padding and special tokens never count
        ranked = task.rankable
        if task.question is not None:
            ranked = ~task.question if ranked is None else ranked & ~task.question
        kw = {} if ranked is None else {"rankable": ranked}
        m["mass acc"] = nanmean(localisation.relevance_mass_accuracy(rel, task.evidence, **kw))
        m["rank acc"] = nanmean(localisation.relevance_rank_accuracy(rel, task.evidence, **kw))
        m["pointing"] = nanmean(localisation.pointing_game(rel, task.evidence, **kw))
    if task.spans is not None:
        exclude = task.question if task.rankable is None else (~task.rankable | task.question)
        for label, spans in (("TPS", task.predicted_spans), ("TGS", task.spans)):
            m[f"{label} top-1"] = nanmean(qa.top_k_in_span(rel, spans, k=1, exclude=exclude))
            m[f"{label} top-2"] = nanmean(qa.top_k_in_span(rel, spans, k=2, exclude=exclude))
        m["IoU (P)"] = nanmean(qa.span_iou(rel, task.predicted_spans, exclude=exclude))
    return row


def replacement(task: Task, args) -> str:
    """``--replacement`` if given, else the task's own choice, else the paper's blur."""
    return args.replacement or task.replacement or "blur"


def blur_sigma(task: Task) -> float:
    """The paper's sigma (20 px on 224 px images) scaled to the task's image size."""
    return 20.0 * task.inputs.shape[-1] / 224


def blur_kernel(task: Task) -> int:
    """The paper's kernel (51 px on 224 px images) scaled to the task's image size, odd."""
    k = round(51 * task.inputs.shape[-1] / 224)
    return max(3, k if k % 2 else k + 1)


SANITY_METHODS = ["dynamiclrp:dynamiclrp", "dynamiclrp:gamma", "saliency", "inputxgradient"]


def sanity_rows(task: Task, args) -> list[str]:
    """Cascading parameter randomisation (Adebayo et al.) of an image task's model: the mean
    Spearman correlation of each method's attribution with the trained model's, per step."""
    n = min(len(task), 16)
    x, target = task.inputs[:n], task.targets[:n]
    table = {}
    for name in SANITY_METHODS:
        method = make_method(name, **method_kwargs(name, args))

        def attribute(model, x_, t_, method=method):
            return method(Problem(forward=model, x=x_, target=t_, model=model)).sum(1)

        table[name] = sanity.parameter_randomisation(task.model, attribute, x, target).rows()
    layers = [row[0] for row in next(iter(table.values()))]
    lines = [
        f"## Sanity check: cascading parameter randomisation ({task.name}, {n} samples)",
        "",
        "Mean Spearman rank correlation (signed / absolute) between the attribution of the "
        "trained model and of a copy whose modules were re-initialised from the output down "
        "to the row's module. A method that depends on the weights falls towards 0.",
        "",
        "| randomised down to | " + " | ".join(SANITY_METHODS) + " |",
        "|---" * (len(SANITY_METHODS) + 1) + "|",
    ]
    for j, layer in enumerate(layers):
        cells = [f"{fmt(table[m][j][1])} / {fmt(table[m][j][2])}" for m in SANITY_METHODS]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines + [""]


def method_kwargs(name: str, args) -> dict:
    if name.startswith("lxt:"):
        return {"python": args.lxt_python}
    if args.quick and name in ("integrated_gradients", "gradientshap", "smoothgrad"):
        return {"n_steps": 8} if name == "integrated_gradients" else {"n_samples": 4}
    return {}


def nanmean(values: torch.Tensor) -> float:
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(values[~values.isnan()].mean()) if (~values.isnan()).any() else math.nan


# ---------------------------------------------------------------------------------------------
# Report


COLUMNS = [
    "abpc",
    "comprehensiveness",
    "sufficiency",
    "mass acc",
    "rank acc",
    "pointing",
    "TPS top-1",
    "TPS top-2",
    "TGS top-1",
    "TGS top-2",
    "IoU (P)",
    "examples/s",
    "peak MiB",
]


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}"


def task_table(task: Task, rows: list[Row]) -> list[str]:
    cols = [c for c in COLUMNS if any(c in r.metrics for r in rows)]
    best = {}
    for c in cols:
        vals = [(r.metrics[c], r.method) for r in rows if c in r.metrics and r.error is None]
        vals = [(v, n) for v, n in vals if not math.isnan(v)]
        if vals and c not in ("examples/s", "peak MiB"):
            pick = min if c == "sufficiency" else max
            best[c] = pick(vals)[1]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | FAILED: {r.error} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for c in cols:
            text = fmt(r.metrics.get(c))
            text = f"**{text}**" if best.get(c) == r.method else text
            if c == "abpc" and "abpc_se" in r.metrics:  # the standard error of the mean
                text += f" ± {fmt(r.metrics['abpc_se'])}"
            cells.append(text)
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return lines


def summary_table(results: dict[str, list[Row]]) -> list[str]:
    """Methods x tasks, the task's headline metric (ABPC, or TPS top-1 for QA)."""
    tasks = list(results)
    head = {
        t: ("TPS top-1" if any("TPS top-1" in r.metrics for r in results[t]) else "abpc")
        for t in tasks
    }
    methods = []
    for rows in results.values():
        methods += [r.method for r in rows if r.method not in methods]
    lines = [
        "| method | " + " | ".join(f"{t} ({head[t]})" for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name in methods:
        cells = []
        for t in tasks:
            r = next((r for r in results[t] if r.method == name), None)
            cells.append("-" if r is None or r.error else fmt(r.metrics.get(head[t])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(task: Task, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r.curves is not None and r.error is None]
    if not curves:
        return
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in curves:
        x, morf, lerf = r.curves
        style = "-" if r.method.startswith("dynamiclrp") else "--"
        ax_m.plot(x, morf, style, label=r.method)
        ax_l.plot(x, lerf, style, label=r.method)
    ax_m.set_title(f"{task.name}: MoRF (lower is better)")
    ax_l.set_title(f"{task.name}: LeRF (higher is better)")
    for ax in (ax_m, ax_l):
        ax.set_xlabel("fraction of features replaced")
    ax_m.set_ylabel(
        "score of the explained class" if task.score != "probability" else "probability"
    )
    ax_l.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results, tasks, args, seconds: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Faithfulness of attributions",
        "",
        f"Generated by `python benchmarks/faithfulness.py {' '.join(sys.argv[1:])}` "
        f"on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), in {seconds / 60:.1f} minutes.",
        "",
        "Higher is better except sufficiency and peak memory; the best value per column is bold; "
        "ABPC is given with the standard error of its mean over the samples. "
        "`examples/s` and `peak MiB` are the attribution's alone (perturbation excluded); LxT "
        "runs in a worker process per task, so its rate includes that process's start and its "
        "memory is not measured. "
        "Definitions: `docs/evaluation.md`. Perturbation: "
        f"{args.steps} steps on a normalised x-axis, images replaced as each task says (the "
        "paper's Gaussian blur, scaled to the image size, unless stated), "
        "tokens by the task's replacement id; scores are per-sample probabilities of the "
        "explained (predicted) class unless the task says otherwise.",
        "",
        "## Summary (headline metric per task)",
        "",
        *summary_table(results),
        "",
    ]
    for name, rows in results.items():
        task = tasks[name]
        info = ", ".join(
            f"{k}={_fmt_info(v)}" for k, v in task.info.items() if not isinstance(v, dict | list)
        )
        lines += [
            f"## {name}",
            "",
            f"{len(task)} samples; {info}."
            + (f" Images replaced by `{replacement(task, args)}`." if task.kind == "image" else ""),
            "",
            *task_table(task, rows),
            "",
        ]
        png = out.parent / f"faithfulness-{name}.png"
        plot(task, rows, png)
        if png.exists():
            lines += [f"![{name} curves]({png.name})", ""]
    sanity_task = next((t for t in tasks.values() if t.kind == "image"), None)
    if args.sanity and sanity_task is not None:
        lines += sanity_rows(sanity_task, args)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def _fmt_info(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small subsets and few methods (CI)")
    mode.add_argument("--full", action="store_true", help="every task and method")
    p.add_argument("--tasks", default=None, help="comma list (default: all)")
    p.add_argument(
        "--real",
        action="append",
        default=[],
        help="a paper setup from local files, e.g. 'vgg16-imagenette:model=PATH,data=DIR' "
        "(see docs/evaluation.md); repeatable; with --real only these tasks run unless --tasks",
    )
    p.add_argument("--methods", default=None, help="comma list (default: by task)")
    p.add_argument("--n", type=int, default=None, help="evaluation samples per task")
    p.add_argument("--steps", type=int, default=None, help="perturbation steps (default 20)")
    p.add_argument(
        "--replacement", default=None, help="image replacement: blur|mean|zero (default: per task)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="progress bars (tqdm)")
    p.add_argument("--lxt-python", default=os.environ.get("DYNAMICLRP_LXT_PYTHON"))
    p.add_argument("--out", default=None)
    p.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the sanity check")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n = args.n or (32 if args.quick else 256)
    args.steps = args.steps or (10 if args.quick else 20)
    args.out = args.out or (
        "docs/results/faithfulness-quick.md" if args.quick else "docs/results/faithfulness.md"
    )
    builders = all_tasks()
    for spec in args.real:
        from tasks.real import parse_spec

        builders[spec] = lambda quick, n_eval, spec=spec: parse_spec(spec, n_eval=n_eval)
    names = args.tasks.split(",") if args.tasks else (args.real or list(builders))
    unknown = [n for n in names if n not in builders]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {sorted(builders)}")
    t_start = time.perf_counter()
    results, tasks, failed = {}, {}, 0
    for name in names:
        t0 = time.perf_counter()
        task = builders[name](quick=args.quick, n_eval=args.n)
        name = task.name
        tasks[name] = task
        print(
            f"== {name}: {len(task)} samples, built in {time.perf_counter() - t0:.1f} s, {task.info}"
        )
        results[name] = []
        for method in methods_for(task, args):
            t0 = time.perf_counter()
            try:
                row = evaluate(task, method, args)
            except Exception as exc:  # one failed row must not hide the others; reported below
                traceback.print_exc()
                row = Row(name, method, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                failed += 1
            results[name].append(row)
            shown = {k: round(v, 4) for k, v in row.metrics.items()}
            print(f"  {method:36s} {time.perf_counter() - t0:6.1f} s  {row.error or shown}")
    write_report(results, tasks, args, time.perf_counter() - t_start)
    if failed:
        print(f"{failed} method run(s) FAILED (see tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
