"""What an operator sees of a decision: RUN/analysis/curve.png and records in RUN/tb/.

The picture: the validation loss (the shipped weights', EMA when the run keeps it; the raw
weights' beside it), its smoothed curve, the knee rule's threshold, the knee, where the rule
fired (the pretrain's stop), the divergence onset and the chosen checkpoint (top), and the loss
per log-SNR interval with each interval's own knee (bottom).
TensorBoard, in the same run as the loss curves: the decision and the stop as text
(`esgf/decision`, `esgf/stop`), the picture (`esgf/curve`), the scalars `esgf/checkpoint_step`
and `esgf/diverged` (1 at the onset); and marker runs RUN/analysis/tb/{knee,stop,diverged}, each
a vertical segment on the `loss/val_loss` chart at its step (TensorBoard overlays runs that share
a tag: `make tensorboard` serves runs/, which holds both).
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import tempfile
from collections.abc import Callable

from linearsr.ckpt_analysis.decision import Analysis
from linearsr.core import storage
from linearsr.core.storage import dumps, is_local, join, local_path, write_bytes_atomic
from linearsr.trainer.rundir import RunDir, read_metrics

log = logging.getLogger(__name__)

VAL_TAG = "loss/val_loss"  # the trainer's val-loss chart (trainer/tb.py)


def plot_curve(analysis: Analysis, title: str = ""):
    """A matplotlib Figure of the analysis (Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    c, d = analysis.curve, analysis.decision
    fig = Figure(figsize=(9, 6.5), dpi=100)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    weights = "EMA weights" if c.val_loss_raw is not None else "raw"
    finite = [(s, v) for s, v in zip(c.steps, c.val_loss) if math.isfinite(v)]
    if finite:
        ax.plot(*zip(*finite), "o-", color="tab:blue", alpha=0.35, ms=3, lw=1, label=f"val loss ({weights})")
    if c.val_loss_raw is not None:
        raw = [(s, v) for s, v in zip(c.steps, c.val_loss_raw) if math.isfinite(v)]
        ax.plot(*zip(*raw), ".", color="tab:gray", alpha=0.5, ms=3, label="val loss (raw weights)")
    if analysis.smoothed:
        ax.plot(c.steps[: len(analysis.smoothed)], analysis.smoothed, color="tab:blue", lw=2.2, label="smoothed (no lag)")
    check = analysis.knee.check if analysis.knee else analysis.check
    if check is not None:
        ax.axhline(check.threshold, color="tab:green", ls="--", lw=1,
                   label="knee threshold" + ("" if analysis.knee else " (rule not met yet)"))
    for s, v in zip(c.steps, c.val_loss):
        if not math.isfinite(v):
            ax.axvline(s, color="black", ls=":", lw=1)
    cmap = matplotlib.colormaps["viridis"]
    per = (d or {}).get("intervals") or {}
    for i, (key, vals) in enumerate(c.by_interval.items()):
        pts = [(s, v) for s, v in zip(c.steps, vals) if math.isfinite(v)]
        if pts:
            color = cmap(i / max(1, len(c.by_interval) - 1))
            ax2.plot(*zip(*pts), "-", color=color, lw=1.2, label=f"λ ∈ [{key.replace(',', ', ')})")
            knee = (per.get(key) or {}).get("knee_step")
            if knee is not None:
                ax2.plot([knee], [dict(pts).get(knee, pts[-1][1])], "v", color=color, ms=7)
    for a in (ax, ax2):
        if analysis.knee_step is not None:
            a.axvline(analysis.knee_step, color="tab:green", lw=1.8, label="knee" if a is ax else None)
        if d is not None and d.get("confirmed_at") is not None:
            a.axvline(d["confirmed_at"], color="tab:purple", ls="-.", lw=1.2,
                      label="rule fired (pretrain stopped)" if a is ax and d["method"] == "knee" else
                      ("divergence seen" if a is ax else None))
        if analysis.divergence is not None:
            a.axvspan(analysis.divergence.step, c.steps[-1] if c.steps else analysis.divergence.step,
                      color="tab:red", alpha=0.12, label="diverged" if a is ax else None)
            a.axvline(analysis.divergence.step, color="tab:red", lw=1.5)
    if d is not None and d.get("checkpoint_step") is not None:
        step = d["checkpoint_step"]
        val = dict(zip(c.steps, c.val_loss)).get(step)
        if val is not None and math.isfinite(val):
            ax.plot([step], [val], marker="*", ms=16, color="tab:orange", ls="none", label=f"chosen checkpoint (step {step})")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax2.set_ylabel("loss per log-SNR interval (▼ its knee)")
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
             f"- knee step: {decision.get('knee_step')}, confirmed at step {decision.get('confirmed_at')}",
             f"- diverged at: {'step ' + str(decision['diverged_at']) if decision.get('diverged_at') is not None else 'no divergence'}",
             f"- reason: {decision['reason']}", ""]
    per = decision.get("intervals") or {}
    if per:
        lines += ["| log-SNR interval | knee step | checkpoint step |", "|---|---|---|"]
        lines += [f"| {k} | {v['knee_step']} | {v['checkpoint_step']} |" for k, v in per.items()]
        lines.append("")
    lines += ["```", dumps(decision.get("params", {}), indent=1, sort_keys=True), "```"]
    return "\n".join(lines)


def _write_events(run: RunDir, marker: str, write: Callable) -> None:
    """Run `write(SummaryWriter)` on an event file in RUN/tb (marker "") or the marker run
    RUN/analysis/tb/<marker>, through a local folder that is copied up when the run dir is remote."""
    from torch.utils.tensorboard import SummaryWriter

    dest = join(run.analysis, "tb", marker) if marker else run.tb
    with tempfile.TemporaryDirectory(prefix="esgf-tb-") as tmp:
        target = local_path(dest) if is_local(dest) else tmp
        writer = SummaryWriter(log_dir=target, filename_suffix=".esgf")
        try:
            write(writer)
        finally:
            writer.close()
        if not is_local(dest):
            for f in glob.glob(os.path.join(tmp, "*.esgf")):
                storage.put_file(f, storage.join(dest, os.path.basename(f)))


def _marker(run: RunDir, name: str, step: int, values: list[float]) -> None:
    """A vertical segment at `step` spanning the val-loss curve, in the marker run RUN/analysis/tb/<name>."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return

    def write(w):
        w.add_scalar(VAL_TAG, min(finite), global_step=step)
        w.add_scalar(VAL_TAG, max(finite), global_step=step)

    _write_events(run, name, write)


def log_to_tensorboard(run: RunDir, analysis: Analysis, decision: dict, png: bytes) -> None:
    """Text, the knee marker and the curve picture (`png`) in RUN/tb/ (local or any fsspec URL)."""
    import numpy as np
    from PIL import Image

    step = decision.get("knee_step") or decision.get("checkpoint_step") or 0

    def write(w):
        w.add_text("esgf/decision", decision_markdown(decision), global_step=step)
        if decision.get("checkpoint_step") is not None:
            w.add_scalar("esgf/checkpoint_step", decision["checkpoint_step"], global_step=decision["checkpoint_step"])
        if analysis.divergence is not None:
            w.add_scalar("esgf/diverged", 1.0, global_step=analysis.divergence.step)
        w.add_image("esgf/curve", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), global_step=step, dataformats="HWC")

    _write_events(run, "", write)
    if analysis.knee_step is not None:
        _marker(run, "knee", analysis.knee_step, analysis.curve.val_loss)
    if analysis.divergence is not None:
        _marker(run, "diverged", analysis.divergence.step, analysis.curve.val_loss)
    log.info("decision logged to TensorBoard in %s", run.tb)


def log_stop(run: RunDir, stop: dict) -> None:
    """The pretrain's stop (state.json's pretrain_stopped) as text and a marker in RUN/tb/."""
    text = f"**pretrain stopped** ({stop['kind']}) after step {stop['last_step']}: {stop['reason']} (job `{stop['job']}`)"
    step = stop["last_step"] or 0
    try:
        _write_events(run, "", lambda w: w.add_text("esgf/stop", text, global_step=step))
        _marker(run, "stop", step, [float(r["val_loss"]) for r in read_metrics(run.url) if r.get("val_loss") is not None])
    except OSError as e:
        log.warning("could not write the stop to TensorBoard at %s: %s", run.tb, e)


def write_decision_outputs(run: RunDir, analysis: Analysis, decision: dict) -> None:
    """decision.json is written by the caller; this adds the picture and the TensorBoard record."""
    png = save_curve(run, analysis)
    try:
        log_to_tensorboard(run, analysis, decision, png)
    except OSError as e:  # the picture and decision.json stand; TensorBoard is a view of them
        log.warning("could not write the decision to TensorBoard at %s: %s", join(run.url, "tb"), e)
