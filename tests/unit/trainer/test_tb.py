"""TensorBoard: a fine-tune writes on its init checkpoint's step axis, so its curves continue
the run it started from."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from linearsr.trainer.tb import TBWriter


def test_a_fine_tune_logs_on_the_pretrains_step_axis(tmp_path):
    tb = TBWriter(str(tmp_path / "expert"), step_offset=450)
    for step in (25, 50):
        tb.scalars({"step": step, "global_step": 450 + step, "val_loss": 0.5, "weights": "ema",
                    "val_loss_by_interval": {"-inf,-2.2": 0.7}}, step)
    tb.text("config", "{}", 0)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "expert" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/val_loss")] == [475, 500]
    assert [e.step for e in acc.Scalars("val_loss_by_interval/-inf,-2.2")] == [475, 500]
    assert "train/global_step" not in acc.Tags()["scalars"] and "train/weights" not in acc.Tags()["scalars"]
