"""The trainer's measured figures, as markdown tables (and a JSON line last): mixed precision, MoE balancing
and activation checkpointing, on the tiny recipe's model (configs/tiny/model.json) and data.

    python scripts/training_figures.py precision [--init DIR] [--lr 1e-5] [--steps 30] [--out runs/figures]
    python scripts/training_figures.py balance [--steps 200] [--rate 1e-2] [--measure DIR ...]
    python scripts/training_figures.py memory [--rows 16] [--objectives ar bdlm mdlm]

precision   the same run in fp32, bf16-mixed (fp32 masters) and pure bf16 from --init (default: the embedded
            model; "scratch": a random model of configs/tiny/model.json), BDLM at block 32 on the Shakespeare
            training text; the loss per step side by side, the fraction of the matrix weights changed after
            3 steps, and OUT/precision.png
balance     AR pre-training from scratch as configs/tiny/ar_pretrain.yaml (shortened to --steps) with the
            expert bias frozen and with --rate; per MoE layer the largest expert's share, the unused experts
            and the loads' coefficient of variation, over the last 10 steps' routed slots; --measure DIR
            adds the loads of a checkpoint (e.g. default: the embedded model) on the validation text
memory      one step per objective with and without run.activation_checkpointing, each in its own process:
            the activation memory autograd holds (activation_mib), the process's peak RSS and the step time
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
DATA = ROOT / "data"
MODES = {"fp32": {}, "bf16-mixed": {"dtype": "bfloat16"},
         "pure-bf16": {"dtype": "bfloat16", "pure_low_precision": True}}


def model_section(init: str) -> dict:
    if init == "scratch":
        return {"config": str(TINY / "model.json"), "tokenizer": str(DATA / "tokenizer.json"), "init_seed": 0}
    from llada_engine.model.default import resolve_checkpoint
    return {"init": str(resolve_checkpoint(init))}


def run_config(out: Path, model: dict, phases: list, *, data: dict = None, optim: dict = None, run: dict = None):
    return {"model": model,
            "data": dict({"train": str(DATA / "shakespeare" / "train.txt"), "row_length": 256, "batch_rows": 8,
                          "split_long": True}, **(data or {})),
            "optim": dict({"lr": 1e-3}, **(optim or {})),
            "run": dict({"out_dir": str(out), "save_every": 0, "threads": 2, "device": "cpu"}, **(run or {})),
            "phases": phases}


def train(raw: dict) -> list[dict]:
    from llada_engine.training.config import config_from_dict
    from llada_engine.training.trainer import train as run_training

    out = Path(raw["run"]["out_dir"])
    if not (out / "metrics.jsonl").is_file():
        run_training(config_from_dict(raw))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def changed_fraction(before: dict, after: dict) -> float:
    """The fraction of the entries of the matrix weights (2-D and more) that differ."""
    changed = total = 0
    for name, a in before.items():
        if a.dim() >= 2:
            changed += int((after[name] != a).sum())
            total += a.numel()
    return changed / total


def start_weights(init: str) -> dict:
    """The state dict (parameter names, fp32) the runs start from."""
    import llada_engine
    from llada_engine.model import LLaDA2Config
    from llada_engine.model.init import random_model

    section = model_section(init)
    if "init" in section:
        model = llada_engine.load_model(section["init"], dtype=torch.float32)
    else:
        model = random_model(LLaDA2Config.from_file(section["config"]), seed=section["init_seed"])
    return {k: v.float() for k, v in model.state_dict().items()}


def precision(args) -> dict:
    import llada_engine
    from safetensors.torch import load_file

    start = start_weights(args.init)
    results = {}
    for name, model in MODES.items():
        out = args.out / f"precision-{name}"
        phases = [{"objective": "bdlm", "block_size": 32, "steps": args.steps}]
        records = train(run_config(out, dict(model_section(args.init), **model), phases, optim={"lr": args.lr},
                                   data={"batch_rows": args.rows}, run={"save_every": 3}))
        third = out / "checkpoints" / "step-0000003"
        if name == "bf16-mixed":
            after = load_file(third / "master.safetensors")
        else:
            after = llada_engine.load_model(third).state_dict()
        before = {k: v.to(after[k].dtype) for k, v in start.items() if k in after}
        results[name] = {"loss": [r["loss"] for r in records if "loss" in r],
                         "changed_after_3": changed_fraction(before, after)}
    print(f"| step | {' | '.join(MODES)} |\n|---|" + "---|" * len(MODES))
    for i in range(args.steps):
        if i < 5 or (i + 1) % 5 == 0:
            print(f"| {i + 1} | " + " | ".join(f"{results[m]['loss'][i]:.4f}" for m in MODES) + " |")
    print("| mean of the last 5 | " + " | ".join(f"{sum(results[m]['loss'][-5:]) / 5:.4f}" for m in MODES) + " |")
    print("| matrix weights changed after 3 steps | "
          + " | ".join(f"{results[m]['changed_after_3']:.1%}" for m in MODES) + " |")
    plot_modes(args.out / "precision.png", results, args)
    return {m: {"final_loss": sum(r["loss"][-5:]) / 5, "changed_after_3": r["changed_after_3"]}
            for m, r in results.items()}


def plot_modes(path: Path, results: dict, args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, r in results.items():
        axes.plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"{name} ({r['changed_after_3']:.0%} of the "
                                                                  f"weights changed after 3 steps)")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (BDLM, block 32)")
    axes.set_title(f"from {args.init}, AdamW at lr {args.lr:g}")
    axes.legend()
    figure.savefig(path)


def tiny_recipe(out: Path, steps: int, **optim) -> dict:
    """configs/tiny/ar_pretrain.yaml shortened to `steps` (its warmup and decay scaled alike)."""
    import yaml

    raw = yaml.safe_load((TINY / "ar_pretrain.yaml").read_text())
    total = sum(p["steps"] for p in raw["phases"])
    o = raw["optim"]
    o.update(warmup_steps=o["warmup_steps"] * steps // total, decay_steps=o["decay_steps"] * steps // total, **optim)
    raw["phases"] = [dict(raw["phases"][0], steps=steps)]
    raw["model"].update(config=str(ROOT / raw["model"]["config"]), tokenizer=str(ROOT / raw["model"]["tokenizer"]))
    raw["data"].update(train=str(ROOT / raw["data"]["train"]), valid=str(ROOT / raw["data"]["valid"]))
    raw["run"].update(out_dir=str(out), eval_every=0, save_every=0, keep_last=0)
    return raw


@torch.no_grad()
def measured_loads(path: str, rows: int = 32) -> dict:
    """Expert-load statistics of checkpoint `path` on the first `rows` validation rows (clean text,
    block_causal at block 32)."""
    import llada_engine
    from llada_engine.training.data import PackedData, read_corpus
    from llada_engine.training.losses import collate
    from llada_engine.training.moe_balance import clear_routing, load_stats, moe_layers, routed_counts
    from llada_engine.training.noise import mask_row

    model = llada_engine.load_model(path).eval()
    c = model.config
    tokenizer = llada_engine.load_tokenizer(path)
    data = PackedData(read_corpus(DATA / "shakespeare" / "valid.txt", tokenizer), 256, eos_id=c.eos_token_id,
                      pad_id=c.pad_token_id, shuffle=False, split_long=True)
    layers = moe_layers(model)
    counts = 0
    for row in data.epoch_rows(rows):
        noisy = mask_row(row, torch.Generator().manual_seed(0), mask_id=c.mask_token_id, t_min=0.0, t_max=0.0)
        batch = collate([(row, n) for n in noisy])
        model(batch.x0, batch.cu_seqlens, block_size=32, mask="block_causal", logits_at=batch.x0[:0])
        counts = counts + routed_counts(layers)
        clear_routing(layers)
    return load_stats(layers, counts)


def mean_stats(records: list[dict], last: int = 10) -> dict:
    """Each layer's statistics averaged over the last `last` steps' records."""
    loads = [r["expert_load"] for r in records if "expert_load" in r][-last:]
    return {layer: {k: sum(l[layer][k] for l in loads) / len(loads) for k in loads[0][layer]} for layer in loads[0]}


def balance(args) -> dict:
    columns = {}
    for rate in [0.0] + args.rate:
        name = "frozen" if rate == 0 else f"rate {rate:g}"
        records = train(tiny_recipe(args.out / f"balance-{rate:g}", args.steps, expert_bias_update_rate=rate))
        columns[f"{name}, training (last 10 steps)"] = mean_stats(records)
    for path in args.measure:
        columns[f"{path}, validation"] = measured_loads(path)
    layers = sorted(next(iter(columns.values())), key=int)
    print("| layer | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for layer in layers:
        cells = [f"max {c[layer]['max_share']:.1%}, unused {c[layer]['unused']:.1f}, cv {c[layer]['cv']:.2f}"
                 for c in columns.values()]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    return columns


def memory_one(args) -> None:
    """One configuration's two steps, in this process: its second step's record and the peak RSS."""
    import time

    raw = json.loads(args.config)
    started = time.perf_counter()
    records = train(raw)
    step = [r for r in records if "loss" in r][-1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"activation_mib": step["activation_mib"], "seconds": step["seconds"], "loss": step["loss"],
                      "peak_rss_mib": rss, "wall_s": time.perf_counter() - started}))


def memory(args) -> dict:
    phases = {"ar": {"objective": "ar"}, "bdlm": {"objective": "bdlm", "block_size": 32},
              "mdlm": {"objective": "mdlm", "block_size": "full"}}
    results = {}
    for objective in args.objectives:
        for checkpointing in (False, True):
            out = args.out / f"memory-{objective}-{'ckpt' if checkpointing else 'plain'}"
            raw = run_config(out, model_section("scratch"), [dict(phases[objective], steps=2)],
                             data={"batch_rows": args.rows, "row_length": args.row_length},
                             run={"activation_checkpointing": checkpointing})
            proc = subprocess.run([sys.executable, __file__, "memory-one", json.dumps(raw)], capture_output=True,
                                  text=True, check=True)
            results[(objective, checkpointing)] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| objective | activation MiB plain | checkpointed | saved | peak RSS MiB plain | checkpointed "
          "| s/step plain | checkpointed |\n|---|---|---|---|---|---|---|---|")
    for objective in args.objectives:
        a, b = results[(objective, False)], results[(objective, True)]
        print(f"| {objective} | {a['activation_mib']:.1f} | {b['activation_mib']:.1f} "
              f"| {1 - b['activation_mib'] / a['activation_mib']:.0%} | {a['peak_rss_mib']:.0f} "
              f"| {b['peak_rss_mib']:.0f} | {a['seconds']:.2f} | {b['seconds']:.2f} |")
    return {f"{o}-{'ckpt' if c else 'plain'}": r for (o, c), r in results.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("precision")
    p.add_argument("--init", default="default")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=8, help="rows of 256 tokens per step")
    b = commands.add_parser("balance")
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--rate", type=float, nargs="*", default=[1e-2])
    b.add_argument("--measure", nargs="*", default=[], help="checkpoints whose validation loads to "
                                                              "measure (e.g. default: the embedded model)")
    m = commands.add_parser("memory")
    m.add_argument("--rows", type=int, default=16, help="rows per step (one micro-batch)")
    m.add_argument("--row-length", type=int, default=256)
    m.add_argument("--objectives", nargs="*", default=["ar", "bdlm", "mdlm"])
    for sub in (p, b, m):
        sub.add_argument("--out", type=Path, default=ROOT / "runs" / "figures")
    one = commands.add_parser("memory-one")
    one.add_argument("config")
    args = parser.parse_args(argv)
    if args.command == "memory-one":
        return memory_one(args)
    record = {"precision": precision, "balance": balance, "memory": memory}[args.command](args)
    print(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
