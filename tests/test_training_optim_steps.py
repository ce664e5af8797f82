"""A resumed optimiser keeps its step counters where torch creates them (on the host unless the
group is capturable or fused), whatever device the checkpoint was mapped to."""

import sys
from pathlib import Path

import torch

from hapkit.training.checkpoint import load_checkpoint
from hapkit.training.engine import Trainer
from hapkit.training.optim import steps_on_host

sys.path.insert(0, str(Path(__file__).parent))

from test_training_engine import TinySet, tiny_cfg  # noqa: E402


class OnDevice(torch.Tensor):
    """A tensor standing for one mapped to a GPU: moving it anywhere gives a plain tensor, the
    host copy (no GPU is needed to see whether it was moved)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cpu) and isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor)
        return out


def on_device(t):
    return t.clone().as_subclass(OnDevice)


def adam_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def test_steps_move_to_the_host_and_nothing_else_does():
    state = adam_state()
    state["state"] = {i: {k: on_device(v) for k, v in s.items()} for i, s in state["state"].items()}
    out = steps_on_host(state)
    for s, before in zip(out["state"].values(), state["state"].values()):
        assert type(s["step"]) is torch.Tensor and s["step"].dtype == before["step"].dtype
        assert s["step"].item() == 1.0
        assert s["exp_avg"] is before["exp_avg"]  # load_state_dict moves these to the parameter
    assert out["param_groups"] is state["param_groups"]
    assert type(state["state"][0]["step"]) is OnDevice  # the caller's state is left alone


def test_a_capturable_groups_steps_are_left_on_its_device():
    state = adam_state()
    state["param_groups"][0]["capturable"] = True  # (a capturable Adam steps only on a GPU)
    state["state"] = {i: {k: on_device(v) for k, v in s.items()} for i, s in state["state"].items()}
    assert type(steps_on_host(state)["state"][0]["step"]) is OnDevice


def test_the_trainer_resumes_adam_with_host_steps(tmp_path):
    cfg = tiny_cfg("eval.every=0", "eval.at_end=false")
    Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), progress=False, stop_after_steps=1).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for opt in state["optimizers"].values():
        opt["state"] = {i: {k: on_device(v) for k, v in s.items()} for i, s in opt["state"].items()}
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), progress=False)
    trainer.load_state_dict(state)
    steps = [s["step"] for o in trainer.optimizers.values() for s in o.state.values()]
    assert steps and all(type(s) is torch.Tensor and s.device.type == "cpu" for s in steps)
