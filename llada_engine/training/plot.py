"""The loss curve of a run, drawn with matplotlib (its Agg canvas: no display, no pyplot state).

    write_loss_png(path, train=[(step, loss)], valid=[(step, loss)], phases=[(first_step, name)])

Steps are 1-based (a record's step counts the steps done); a phase's first step is 0-based, so its line is
drawn where its first step's record will be. The training loss is a line, the validation loss points joined
by a dashed line, each phase boundary a grey vertical line with the phase's name beside it.
"""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_loss_png(path, train: list, valid: list, phases: list) -> Path:
    figure = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, color="tab:blue", linewidth=1.0, label="train loss")
    if valid:
        steps, losses = zip(*valid)
        axes.plot(steps, losses, color="tab:red", linestyle="--", marker="o", markersize=4, linewidth=1.0,
                  label="validation loss")
    for first, name in phases:
        axes.axvline(first + 1, color="grey", linewidth=0.8, alpha=0.7)
        axes.annotate(name, xy=(first + 1, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -4),
                      textcoords="offset points", rotation=90, va="top", ha="left", fontsize=8, color="dimgrey")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("training run")
    axes.grid(True, alpha=0.3)
    if train or valid:
        axes.legend(loc="upper right")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
