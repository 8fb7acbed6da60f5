"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_history(history: list[dict], path: str, title: str) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], marker=".", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss")
    ax_loss.set_yscale("log")  # an early test loss of hundreds would flatten everything after it
    ax_acc.plot(epochs, [r["train_acc"] for r in history], marker=".", label="train")
    ax_acc.plot(epochs, [r["test_acc"] for r in history], marker=".", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_analysis(results: dict[str, list[dict]], path: str, title: str) -> None:
    """``results``: label -> rows of :func:`train.analysis.analyse`."""
    keys = [
        ("surviving", "fraction of surviving neurons"),
        ("cka", "linear CKA to the input"),
        ("reconstruction_r2", "input reconstruction R^2"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, keys):
        for name, rows in results.items():
            ax.plot([r["relative_depth"] for r in rows], [r[key] for r in rows], marker=".", label=name)
        ax.set(xlabel="relative depth (input -> output)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: str) -> None:
    """One figure per sweep: accuracy, parameters and throughput against depth, and accuracy against
    parameters (the paper's figure 3 and its efficiency claim); bars are one standard deviation over seeds."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for family in sorted({r["family"] for r in rows}):
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["depth"])
        depths = [r["depth"] for r in mine]
        acc, acc_sd = [r["test_acc"] for r in mine], [r.get("test_acc_std", 0.0) for r in mine]
        params = [r["parameters"] / 1e6 for r in mine]
        axes[0].errorbar(depths, acc, yerr=acc_sd, marker="o", capsize=3, label=family)
        axes[1].plot(depths, params, marker="o", label=family)
        speed, speed_sd = [r["images_per_s"] for r in mine], [r.get("images_per_s_std", 0.0) for r in mine]
        axes[2].errorbar(depths, speed, yerr=speed_sd, marker="o", capsize=3, label=family)
        axes[3].errorbar(params, acc, yerr=acc_sd, marker="o", capsize=3, label=family)
        for r, x in zip(mine, params):
            axes[3].annotate(str(r["depth"]), (x, r["test_acc"]), fontsize=7)
    axes[0].set(xlabel="depth", ylabel="test accuracy", title="accuracy vs depth")
    axes[1].set(xlabel="depth", ylabel="parameters (M)", title="parameters vs depth")
    axes[2].set(xlabel="depth", ylabel="training images/s", title="training throughput")
    axes[3].set(xlabel="parameters (M)", ylabel="test accuracy", title="accuracy vs parameters")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for the four panels, below them
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
