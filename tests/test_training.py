"""Tests of training.py, the machinery the training stages share: LAMB and its parameter groups, the schedule,
--field=value configs, plug-ins, the resumable checkpoint and stream, the metrics log and the reports.

    python -m pytest -q tests/test_training.py
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pe_model  # noqa: E402
import training  # noqa: E402

TINY = {"model_class": "CLIP",
        "vision_cfg": {"patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "output_dim": 32,
                       "image_size": 32, "use_cls_token": True, "attn_pooler_heads": 2},
        "text_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 1, "output_dim": 32,
                     "vocab_size": 49408}}


def test_lamb_update_matches_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([0.5]))
    optimizer = training.LAMB([{"params": [weight], "weight_decay": 0.1, "trust_ratio": True},
                                 {"params": [bias], "weight_decay": 0.0, "trust_ratio": False}],
                                lr=0.1, betas=(0.9, 0.99), eps=0.0)
    # step 1: bias-corrected m / sqrt(v) = sign(g) = (1, -1); u = (1, -1) + 0.1 * (3, 4) = (1.3, -0.6);
    # trust ratio 5 / sqrt(1.3^2 + 0.6^2); the bias (no trust ratio, no decay) moves by lr * sign(g)
    weight.grad, bias.grad = torch.tensor([1.0, -2.0]), torch.tensor([0.25])
    optimizer.step()
    ratio = 5 / math.sqrt(1.3**2 + 0.6**2)
    torch.testing.assert_close(weight.detach(), torch.tensor([3 - 0.1 * ratio * 1.3, 4 + 0.1 * ratio * 0.6]))
    torch.testing.assert_close(bias.detach(), torch.tensor([0.4]))
    # step 2, written out per element: m, v with bias correction 1 - beta^2
    w1 = weight.detach().clone()
    weight.grad, bias.grad = torch.tensor([0.5, 0.5]), torch.tensor([0.0])
    optimizer.step()
    m = [0.9 * 0.1 * g1 + 0.1 * 0.5 for g1 in (1.0, -2.0)]
    v = [0.99 * 0.01 * g1**2 + 0.01 * 0.25 for g1 in (1.0, -2.0)]
    u = [(mi / (1 - 0.9**2)) / math.sqrt(vi / (1 - 0.99**2)) + 0.1 * wi for mi, vi, wi in zip(m, v, w1.tolist())]
    ratio = w1.norm().item() / math.hypot(*u)
    expected = [wi - 0.1 * ratio * ui for wi, ui in zip(w1.tolist(), u)]
    torch.testing.assert_close(weight.detach(), torch.tensor(expected))


def test_no_weight_decay_or_trust_ratio_on_biases_norms_embeddings_probe_and_logit_scale():
    model = pe_model.build_model(dict(TINY, vision_cfg=dict(TINY["vision_cfg"], ls_init_value=0.1)))
    decay, no_decay = training.param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and decay["trust_ratio"]
    assert no_decay["weight_decay"] == 0.0 and not no_decay["trust_ratio"]
    for name in ("logit_scale", "positional_embedding", "visual.positional_embedding", "visual.class_embedding",
                 "visual.attn_pool.probe", "visual.ln_pre.weight", "visual.transformer.resblocks.0.ls_1.gamma",
                 "visual.transformer.resblocks.0.attn.in_proj_bias", "ln_final.bias"):
        assert name in plain, name
    for name in ("visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight",
                 "visual.transformer.resblocks.0.attn.in_proj_weight"):
        assert name not in plain, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_follows_the_cosine():
    lrs = [training.lr_at(s, 100, 1.0, 10, min_lr=0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1


@dataclass
class Options:
    steps: int = 10
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    stages: Tuple[str, ...] = ("0.5:32", "0.5:64")
    limit: Optional[int] = None


def test_config_options_override_fields_and_bad_ones_name_the_field():
    cfg = training.parse_config(Options(), ["--steps=5", "--lr=0.5", "--flag", "--stages=1:16", "--limit=none"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.stages, cfg.limit) == (5, 0.5, True, ("1:16",), None)
    for argv, message in ((["--steps=five"], "--steps=five: not a valid int"), (["--nope=1"], "unknown option --nope"),
                          (["--steps"], "--steps needs a value"), (["steps=1"], "unexpected argument")):
        with pytest.raises(SystemExit, match=message):
            training.parse_config(Options(), argv)


def test_plugins_load_module_function_and_name_a_bad_spec(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text("def make(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert training.load_plugin("my_plugin:make", "captioner")(1) == 2
    with pytest.raises(SystemExit, match="--captioner=my_plugin:missing"):
        training.load_plugin("my_plugin:missing", "captioner")


def test_training_checkpoint_round_trip_restores_weights_optimizer_rng_and_position(tmp_path):
    torch.manual_seed(0)
    model = pe_model.build_model(TINY)
    optimizer = training.build_optimizer(model)
    model(torch.randn(2, 3, 32, 32), pe_model.tokenize(["a", "b"]))[0].sum().backward()
    optimizer.step()
    path = str(tmp_path / "step_000001.pt")
    training.save_training_checkpoint(path, model, model, optimizer, 1, (3, 7), 1, {"note": "x"})
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    other = pe_model.build_model(TINY)
    other_optimizer = training.build_optimizer(other)
    blob, position = training.load_training_checkpoint(path, other, other, other_optimizer)
    assert position == (3, 7) and blob["note"] == "x" and int(blob["step"]) == 1
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the writer was
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert pe_model.load_model(path).visual.width == 32  # the model part is an ordinary checkpoint
    # rows of two ranks: refused by another process count
    blob["data_position"] = torch.tensor([[1, 2], [3, 4]])
    torch.save(blob, path)
    with pytest.raises(SystemExit, match="written by 2 process"):
        training.load_training_checkpoint(path, other, other, other_optimizer, rank=0, world_size=3)
    assert training.load_training_checkpoint(path, other, other, None, rank=1, world_size=2)[1] == (3, 4)


def test_metrics_log_keeps_the_resumed_steps_and_a_fresh_run_starts_empty(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = training.MetricsLog(path)
    for step in range(1, 6):
        log.log({"step": step, "loss": float(step)})
    training.MetricsLog(path, resumed_step=3).log({"step": 4, "loss": 0.5})
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                                    {"step": 3, "loss": 3.0}, {"step": 4, "loss": 0.5}]
    training.MetricsLog(path)
    assert open(path).read() == ""


def test_reports_are_strict_json_and_markdown_tables(tmp_path):
    path = str(tmp_path / "results.json")
    training.write_json(path, {"a": float("nan"), "b": [1.5]})
    assert json.load(open(path)) == {"a": None, "b": [1.5]}
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    table = training.markdown_table(["set", "top-1 %"], [["clean", 12.345], ["noto", None]])
    assert table.splitlines() == ["| set | top-1 % |", "|---|---|", "| clean | 12.3 |", "| noto | n/a |"]


def test_the_newest_checkpoints_are_kept(tmp_path):
    for i in range(4):
        path = tmp_path / f"step_{i:06d}.pt"
        path.write_bytes(b"x")
        os.utime(path, (i, i))
    (tmp_path / "final.pt").write_bytes(b"x")
    training.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["final.pt", "step_000002.pt", "step_000003.pt"]
    assert training.latest_checkpoint(str(tmp_path), "step_*.pt").endswith("step_000003.pt")


def test_a_non_finite_model_is_never_written(tmp_path):
    torch.manual_seed(0)
    model = pe_model.build_model(TINY)
    optimizer = training.build_optimizer(model)
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    with pytest.raises(SystemExit, match="visual.proj"):
        training.save_training_checkpoint(str(tmp_path / "step_000001.pt"), model, model, optimizer, 1)
    assert os.listdir(tmp_path) == []
