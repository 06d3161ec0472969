"""DeepSpeed ZeRO-2 and ZeRO-3 through the presets, on CPU processes (`CPUDeepSpeedStrategy`, gloo): the frozen
base has no optimiser state and no place in the checkpoint directory, ZeRO-3 partitions it and the teacher pass
still runs, the plug-in weights export from the (sharded) directory, a run resumes from it, and a checkpoint
refuses a different base. The first DeepSpeed run on a machine JIT-compiles a communication op (~45 s, cached in
.torch_extensions/)."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ops_helpers import ROOT, metric_rows, other_base_dir, run_cli, tiny_experiment  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

ZERO2 = str(ROOT / "configs" / "trainer" / "deepspeed_zero2.yaml")
ZERO3 = str(ROOT / "configs" / "trainer" / "deepspeed_zero3.yaml")
EXPORT = ROOT / "scripts" / "export_plugin.py"


def export_from_checkpoint(checkpoint, output):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_plugin", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return load_file(module.export_plugin(checkpoint, output))


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def model_states(checkpoint_dir):
    files = sorted((checkpoint_dir / "checkpoint").glob("*model_states.pt"))
    assert files, f"no model states in {checkpoint_dir}"
    return [torch.load(f, weights_only=False) for f in files]


def test_zero2_one_process_checkpoint_export_resume_and_wrong_base(tiny_base_dir, other_base_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = str(tiny_experiment(run_dir, tiny_base_dir, max_steps=4, limit_val_batches=1))
    run_cli(["fit", "--config", config, "--config", ZERO2, "--checkpoint.every_n_train_steps", "2"], timeout=180)

    # DeepSpeed keeps the gradients in its own buffers: the logged norm is its engine's, one per step
    norms = [float(r["train/grad_norm"]) for r in metric_rows(run_dir) if r.get("train/grad_norm")]
    assert len(norms) == 4 and all(0 < norm < float("inf") for norm in norms), norms
    # ... the same norm as the one computed from the gradients without DeepSpeed, at the same first step
    plain_dir = tmp_path / "plain"
    run_cli(["fit", "--config", str(tiny_experiment(plain_dir, tiny_base_dir, max_steps=1, limit_val_batches=0))],
            timeout=180)
    (plain,) = [float(r["train/grad_norm"]) for r in metric_rows(plain_dir) if r.get("train/grad_norm")]
    assert norms[0] == pytest.approx(plain, rel=1e-4)

    checkpoint = run_dir / "logs" / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir()
    # written into a staging directory that then replaced the previous save; neither is left behind
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.ckpt"]
    states = model_states(checkpoint)
    assert len(states) == 1 and states[0]["global_step"] == 4
    assert states[0]["module"] and all(k.startswith("compensation.") for k in states[0]["module"])
    assert states[0]["base_model"]["path"] == str(tiny_base_dir)
    optimizer_files = list((checkpoint / "checkpoint").glob("*optim_states.pt"))
    plugin_values = sum(t.numel() for t in load_file(run_dir / "plugin.safetensors").values())
    # fp32 master weights + two AdamW moments of the plug-in alone, not of the 76k-parameter base
    assert sum(f.stat().st_size for f in optimizer_files) < 4 * 4 * plugin_values + 200_000
    assert_same_weights(export_from_checkpoint(checkpoint, tmp_path / "exported.safetensors"),
                        load_file(run_dir / "plugin.safetensors"))
    info = json.loads((tmp_path / "exported.safetensors.json").read_text())
    assert info["plugin"] == "rcp" and info["base_fingerprint"] == states[0]["base_model"]["fingerprint"]

    wrong = run_cli(["fit", "--config", config, "--config", ZERO2, "--ckpt_path", "auto", "--trainer.max_steps", "6",
                     "--model.init_args.base_model_path", str(other_base_dir)], timeout=180, expect_success=False)
    assert "this checkpoint belongs to the base model at" in wrong and "point model.init_args.base_model_path" in wrong

    resumed = run_cli(["fit", "--config", config, "--config", ZERO2, "--ckpt_path", "auto",
                       "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "2"], timeout=180)
    assert f"--ckpt_path auto: resuming from {checkpoint}" in resumed
    assert model_states(checkpoint)[0]["global_step"] == 6
    assert [int(r["step"]) for r in metric_rows(run_dir) if r["train/loss"]] == [4, 5]

    # a plug-in with a pruner the checkpoint has no weights for: named, not left at its initial values
    other = run_cli(["validate", "--config", config, "--config", ZERO2, "--ckpt_path", str(checkpoint),
                     "--model.init_args.compensation.init_args.pruning_layers", "[0, 1, 2, 3]"],
                    timeout=180, expect_success=False)
    assert "does not fit this model: missing ['compensation." in other and ".3." in other.split("missing", 1)[1]


def test_zero2_gradient_accumulation_divides_the_loss_once(tiny_base_dir, tmp_path):
    """Lightning's closure divides each micro-batch's loss by the window's length; the stock strategy lets
    DeepSpeed's backward divide it again (gradients, their norm and clipping at 1/k of a DDP run's)."""
    norms = {}
    for name, extra in (("plain", []), ("zero2", ["--config", ZERO2])):
        run_dir = tmp_path / name
        config = str(tiny_experiment(run_dir, tiny_base_dir, max_steps=2, limit_val_batches=0))
        run_cli(["fit", "--config", config, *extra, "--trainer.accumulate_grad_batches", "2"], timeout=180)
        norms[name] = [float(r["train/grad_norm"]) for r in metric_rows(run_dir) if r.get("train/grad_norm")]
    assert len(norms["plain"]) == 2
    assert norms["zero2"][0] == pytest.approx(norms["plain"][0], rel=1e-4)


def test_zero3_two_processes_partition_the_base_train_validate_skip_export_and_resume(tiny_base_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = str(tiny_experiment(run_dir, tiny_base_dir, max_steps=4, limit_val_batches=1))
    # DeepSpeed keeps parameters under 1e5 values whole on every rank: with threshold 0 the tiny base is partitioned
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True}
    # the saliency ranking loss on: its teacher pass takes a gradient through the partitioned base
    common = ["fit", "--config", config, "--config", ZERO3, "--trainer.devices", "2",
              f"--trainer.strategy.init_args.config={json.dumps(zero3)}", "--checkpoint.every_n_train_steps", "2",
              "--model.init_args.compensation.init_args.saliency_weight", "1.0"]
    run_cli(common + ["--trainer.callbacks+=ops_helpers.PartitionProbe",
                      f"--trainer.callbacks.init_args.record={run_dir / 'partition'}",
                      "--trainer.callbacks+=ops_helpers.NaNAt", "--trainer.callbacks.init_args.step=1",
                      "--trainer.callbacks.init_args.rank=1",
                      f"--trainer.callbacks.init_args.record={run_dir / 'checksums'}"], timeout=240)

    for rank in (0, 1):  # each rank holds about half of the frozen base
        probe = json.loads((run_dir / f"partition.{rank}.json").read_text())
        assert 0.45 * probe["total"] < probe["held"] < 0.6 * probe["total"]
    rows = metric_rows(run_dir)
    # the teacher pass ran under ZeRO-3 and the noisy student dropped tokens: a finite, non-zero repair loss at every
    # trained step (step 1 is left out: rank 1's non-finite loss skipped it; the row holds rank 0's own terms)
    repair = {int(r["step"]): float(r["train/repair"]) for r in rows
              if r["train/repair"] and not r["train/skipped_steps"]}
    assert sorted(repair) == [0, 2, 3] and all(0 < value < float("inf") for value in repair.values()), repair
    saliency = {int(r["step"]): float(r["train/saliency"]) for r in rows
                if r["train/saliency"] and not r["train/skipped_steps"]}
    assert sorted(saliency) == [0, 2, 3] and all(0 < value < float("inf") for value in saliency.values()), saliency
    assert [r for r in rows if r.get("val/avg_visual_tokens")], "no validation (generation under ZeRO-3) was logged"
    # the engine's norm for every step it took, NaN for the skipped one (its norm is the step before's)
    norms = {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    assert sorted(norms) == [0, 1, 2, 3] and math.isnan(norms[1]), norms
    assert all(0 < norms[step] < float("inf") for step in (0, 2, 3)), norms
    ranks = [[json.loads(line) for line in (run_dir / f"checksums.{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)]
    checksums = {entry["step"]: entry["checksum"] for entry in ranks[0]}
    assert ranks[0] == ranks[1] and checksums[2] == checksums[1] != checksums[3]

    checkpoint = run_dir / "logs" / "run" / "checkpoints" / "last.ckpt"
    states = model_states(checkpoint)
    assert len(states) == 2 and not [k for s in states for k in s["module"] if not k.startswith("compensation.")]
    assert_same_weights(export_from_checkpoint(checkpoint, tmp_path / "exported.safetensors"),
                        load_file(run_dir / "plugin.safetensors"))

    resumed = run_cli(common + ["--ckpt_path", "auto", "--trainer.max_steps", "6",
                                "--trainer.callbacks+=ops_helpers.ChecksumAtStart",
                                f"--trainer.callbacks.init_args.record={run_dir / 'start'}"], timeout=240)
    assert f"--ckpt_path auto: resuming from {checkpoint}" in resumed
    assert model_states(checkpoint)[0]["global_step"] == 6
    assert [int(r["step"]) for r in metric_rows(run_dir) if r["train/loss"]] == [4, 5]
    for rank in (0, 1):  # the resumed run starts from the sharded weights of step 4, gathered
        assert json.loads((run_dir / f"start.{rank}.json").read_text()) == {"step": 4, "checksum": checksums[4]}


def test_zero3_two_processes_keep_accm_and_an_uneven_sweep_in_step(tiny_base_dir, tmp_path):
    """Under ZeRO-3 every module call gathers weights collectively, so the ranks must make the same calls: ACCM's
    warm-start descriptions and beam search decode their full length even when (as made here on rank 1) every
    sequence ends at once, and a sweep split of 3 batches over 2 ranks gives the rank with fewer batches a discarded
    extra run. Without either the run hangs (the timeout fails it)."""
    run_dir = tmp_path / "run"
    config_path = tiny_experiment(run_dir, tiny_base_dir, max_steps=4, limit_val_batches=1)
    config = yaml.safe_load(config_path.read_text())
    config["model"]["init_args"]["compensation"] = {
        "class_path": "lvlm_prune.accm.compensation.ACCMCompensation",
        "init_args": {"target_prune_ratio": 0.875, "caption_embed_dim": 32, "caption_num_layers": 1,
                      "caption_num_heads": 2, "caption_prefix_length": 2, "caption_mapper_layers": 1,
                      "max_caption_tokens": 6, "max_instruction_tokens": 16, "selector_hidden": 16,
                      "selector_heads": 2, "selector_question_prefix": "",
                      "selector_supplement_prefix": "additional information :", "warmup_fraction": 0.5}}
    config["data"]["init_args"]["num_val"] = 24  # 3 batches of 8: rank 0 evaluates two, rank 1 one
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.sweep.PruningSweep",
         "init_args": {"methods": ["accm", "accm_prune_only"], "prune_ratios": [0.875], "split": "val",
                       "run_after_fit": True, "run_after_test": False, "dirpath": str(run_dir / "sweep")}},
        {"class_path": "ops_helpers.EndGenerationEarly", "init_args": {"rank": 1}},
    ]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True}
    run_cli(["fit", "--config", str(config_path), "--config", ZERO3, "--trainer.devices", "2",
             f"--trainer.strategy.init_args.config={json.dumps(zero3)}"], timeout=300)

    stages = [float(r["train/stage"]) for r in metric_rows(run_dir) if r.get("train/stage")]
    assert stages == [1.0, 1.0, 2.0, 2.0]  # the warm start, then the KL-ranked stage with beam search
    assert [r for r in metric_rows(run_dir) if r.get("val/acc")], "no validation (ACCM generation) was logged"
    rows = json.loads((run_dir / "sweep" / "sweep.json").read_text())["rows"]
    assert {(r["method"], r["num_samples"]) for r in rows} == {("accm", 24), ("accm_prune_only", 24)}


def test_zero3_two_processes_train_the_base_and_export_it_whole(tmp_path):
    """The base trains with every parameter partitioned; its export gathers them (one submodule at a time) and
    writes the trained weights, equal to the checkpoint's consolidated fp32 state, not the ranks' empty shards."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from lvlm_prune.modeling.loading import load_base_model
    from test_cli import TINY_BASE_ARGS

    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True}
    run_cli(["fit", "--config", str(ROOT / "configs" / "synthetic" / "base_describe.yaml"), "--config", ZERO3,
             "--trainer.devices", "2", f"--trainer.strategy.init_args.config={json.dumps(zero3)}", *TINY_BASE_ARGS,
             "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir",
             str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.init_args.export_dir",
             str(tmp_path / "export")], timeout=240)

    checkpoint = tmp_path / "base_describe" / "run" / "checkpoints" / "last.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp_path / "consolidated.pt"))
    trained = torch.load(tmp_path / "consolidated.pt", weights_only=False)["state_dict"]
    exported = load_base_model(str(tmp_path / "export")).state_dict()
    assert sum(t.numel() for t in exported.values()) > 50_000
    assert all(torch.equal(value, trained[f"model.{name}"]) for name, value in exported.items() if f"model.{name}" in trained)
    # the frozen parts (no loss reaches CLIP's post-layernorm) are not in the optimiser's state: exported as built
    frozen = {name for name in exported if f"model.{name}" not in trained}
    assert frozen == {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert (exported["model.vision_tower.post_layernorm.weight"] == 1).all()
    assert (exported["model.vision_tower.post_layernorm.bias"] == 0).all()


COPY_UNDER_ZERO3 = """
import copy, os, socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed, torch
from lvlm_prune.compensation import copy_weights
module = torch.nn.ModuleDict({"policy": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))})
module["reference"] = copy.deepcopy(module["policy"]).requires_grad_(False)
config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
deepspeed.initialize(model=module, model_parameters=list(module["policy"].parameters()), config=config)
policy, reference = module["policy"], module["reference"]
assert all(p.numel() == 0 for p in reference.parameters())  # partitioned
with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=0):
    for p in policy.parameters():
        p.data.fill_(1.0)
copy_weights(policy, reference)
with deepspeed.zero.GatheredParameters(list(reference.parameters())):
    print("copied", all(bool((p == 1).all()) for p in reference.parameters()))
"""


def test_copy_weights_copies_zero3_partitions(tmp_path):
    # ACCM's DPO reference snapshot: load_state_dict(state_dict()) of partitioned modules copies nothing, silently
    import subprocess
    import sys

    from ops_helpers import cli_env

    result = subprocess.run([sys.executable, "-c", COPY_UNDER_ZERO3], cwd=ROOT, env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "copied True" in result.stdout
