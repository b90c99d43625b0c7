"""What an operator sees of a decision: RUN/analysis/curve.png and markers in RUN/tb/.

The picture: raw and smoothed validation loss with the knee, the divergence onset and the
chosen checkpoint marked (top), and the loss per log-SNR interval (bottom).
TensorBoard: the decision as text, scalars `esgf/knee` (the smoothed loss, one point at the knee
step), `esgf/diverged` (at the onset) and `esgf/checkpoint_step`, and the picture as an image,
written as a separate event file in RUN/tb/ so they show in the same run as the loss curves.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import tempfile

from linearsr.ckpt_analysis.decision import Analysis
from linearsr.core import storage
from linearsr.trainer.rundir import RunDir, dumps, is_local, join, local_path, write_bytes_atomic

log = logging.getLogger(__name__)


def plot_curve(analysis: Analysis, title: str = ""):
    """A matplotlib Figure of the analysis (Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    c = analysis.curve
    fig = Figure(figsize=(9, 6.5), dpi=100)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    finite = [(s, v) for s, v in zip(c.steps, c.val_loss) if math.isfinite(v)]
    if finite:
        ax.plot(*zip(*finite), "o-", color="tab:blue", alpha=0.35, ms=3, lw=1, label="val loss (raw)")
    if analysis.smoothed:
        ax.plot(c.steps[: len(analysis.smoothed)], analysis.smoothed, color="tab:blue", lw=2.2, label="smoothed")
    for s, v in zip(c.steps, c.val_loss):
        if not math.isfinite(v):
            ax.axvline(s, color="black", ls=":", lw=1)
    cmap = matplotlib.colormaps["viridis"]
    for i, (key, vals) in enumerate(c.by_interval.items()):
        pts = [(s, v) for s, v in zip(c.steps, vals) if math.isfinite(v)]
        if pts:
            color = cmap(i / max(1, len(c.by_interval) - 1))
            ax2.plot(*zip(*pts), "-", color=color, lw=1.2, label=f"λ ∈ [{key.replace(',', ', ')})")
    for a in (ax, ax2):
        if analysis.knee_step is not None:
            a.axvline(analysis.knee_step, color="tab:green", lw=1.8, label="knee" if a is ax else None)
        if analysis.divergence is not None:
            a.axvspan(analysis.divergence.step, c.steps[-1] if c.steps else analysis.divergence.step,
                      color="tab:red", alpha=0.12, label="diverged" if a is ax else None)
            a.axvline(analysis.divergence.step, color="tab:red", lw=1.5)
    d = analysis.decision
    if d is not None and d.get("checkpoint_step") is not None:
        step = d["checkpoint_step"]
        val = dict(zip(c.steps, c.val_loss)).get(step)
        if val is not None and math.isfinite(val):
            ax.plot([step], [val], marker="*", ms=16, color="tab:orange", ls="none", label=f"chosen checkpoint (step {step})")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax2.set_ylabel("loss per log-SNR interval")
    ax2.set_xlabel("step")
    if c.by_interval:
        ax2.legend(fontsize=7, loc="upper right")
    status = d["reason"] if d else analysis.reason
    fig.text(0.01, 0.005, status[:160] + ("…" if len(status) > 160 else ""), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def curve_png(run: RunDir, analysis: Analysis) -> bytes:
    fig = plot_curve(analysis, title=f"{os.path.basename(run.url.rstrip('/'))}: validation loss")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_curve(run: RunDir, analysis: Analysis) -> bytes:
    """Write RUN/analysis/curve.png (atomically); returns the PNG bytes."""
    png = curve_png(run, analysis)
    write_bytes_atomic(run.curve, png)
    return png


def decision_markdown(decision: dict) -> str:
    lines = [f"**ESGF decision** ({decision['method']})", "",
             f"- checkpoint: `{decision['checkpoint']}` (step {decision.get('checkpoint_step')})",
             f"- knee step: {decision.get('knee_step')}",
             f"- diverged at: {'step ' + str(decision['diverged_at']) if decision.get('diverged_at') is not None else 'no divergence'}",
             f"- reason: {decision['reason']}", "",
             "```", dumps(decision.get("params", {}), indent=1, sort_keys=True), "```"]
    return "\n".join(lines)


def log_to_tensorboard(run: RunDir, analysis: Analysis, decision: dict, png: bytes) -> None:
    """Text, scalar markers and the curve picture (`png`) in RUN/tb/ (local or any fsspec URL)."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    step = decision.get("knee_step") or decision.get("checkpoint_step") or 0
    with tempfile.TemporaryDirectory(prefix="esgf-tb-") as tmp:
        target = local_path(run.tb) if is_local(run.tb) else tmp
        writer = SummaryWriter(log_dir=target, filename_suffix=".esgf")
        try:
            writer.add_text("esgf/decision", decision_markdown(decision), global_step=step)
            if analysis.knee_index is not None:
                writer.add_scalar("esgf/knee", analysis.smoothed[analysis.knee_index], global_step=analysis.knee_step)
            if analysis.divergence is not None:
                writer.add_scalar("esgf/diverged", 1.0, global_step=analysis.divergence.step)
            if decision.get("checkpoint_step") is not None:
                writer.add_scalar("esgf/checkpoint_step", decision["checkpoint_step"], global_step=decision["checkpoint_step"])
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            writer.add_image("esgf/curve", image, global_step=step, dataformats="HWC")
        finally:
            writer.close()
        if not is_local(run.tb):
            for f in glob.glob(os.path.join(tmp, "*.esgf")):
                storage.put_file(f, storage.join(run.tb, os.path.basename(f)))
    log.info("decision logged to TensorBoard in %s", run.tb)


def write_decision_outputs(run: RunDir, analysis: Analysis, decision: dict) -> None:
    """decision.json is written by the caller; this adds the picture and the TensorBoard record."""
    png = save_curve(run, analysis)
    try:
        log_to_tensorboard(run, analysis, decision, png)
    except OSError as e:  # the picture and decision.json stand; TensorBoard is a view of them
        log.warning("could not write the decision to TensorBoard at %s: %s", join(run.url, "tb"), e)
