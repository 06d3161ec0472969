"""`cli.py` in pieces (the `--ckpt_path` checks, `auto`, settings that differ from a checkpoint's, config files,
constructor errors, the trainer it builds) and the two helpers it runs on: `lvlm_prune.archives` (checkpoint
integrity, exports, digests) and `lvlm_prune.runner` (one method's generation and its per-sample cost)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
import zipfile
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy

from callbacks.requeue import SlurmRequeue
from callbacks.resume import ResumableDataOrder
from cli import LVLMPruneCLI, check_config_files, cli_main
from conftest import make_tiny_llava
from lightning_modules.strategies import AtomicCheckpointIO
from lvlm_prune.archives import staged_export, torch_archive_problem, weights_digest, with_default_permissions
from lvlm_prune.flops import llava_prefill_report
from lvlm_prune.runner import GenerationResult, generate_with_method, per_sample_flops, prompt_text_tokens, vision_crops
from test_cli import TINY_BASE_ARGS, run_dir_args

# ----------------------------------------------------------------------------------------------- --ckpt_path


def bare_cli(subcommand: str, **settings) -> LVLMPruneCLI:
    """The CLI object as it stands after parsing, without building anything."""
    cli = LVLMPruneCLI.__new__(LVLMPruneCLI)
    cli.config = {"subcommand": subcommand, subcommand: settings}
    return cli


@pytest.mark.parametrize("value", ["auto", "last", "best", "hpc", "registry", "registry:org/model:latest"])
def test_checkpoint_keywords_and_registry_names_are_not_looked_for_on_disk(value, monkeypatch, tmp_path):
    """Lightning's keywords, `auto` and `registry:` names pass the missing-file check (no such file exists here),
    while the same name as a path that is no keyword is refused, naming it."""
    monkeypatch.chdir(tmp_path)  # a file of that name in the working directory would pass the check anyway
    assert not os.path.exists(value)
    bare_cli("fit", ckpt_path=value)._parse_ckpt_path()
    not_a_keyword = f"./{value}"  # the same name as a relative path
    with pytest.raises(FileNotFoundError, match=rf"^--ckpt_path '{re.escape(not_a_keyword)}' does not exist"):
        bare_cli("fit", ckpt_path=not_a_keyword)._parse_ckpt_path()


def test_a_deepspeed_checkpoint_directory_is_a_checkpoint(tmp_path, monkeypatch):
    """A directory with a `latest` file is accepted, and not read as a torch.save archive; without `latest` it is
    refused."""
    import cli as cli_module

    read = []
    monkeypatch.setattr(cli_module, "torch_archive_problem", lambda path: read.append(path))
    (tmp_path / "last.ckpt" / "checkpoint").mkdir(parents=True)
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare_cli("test", ckpt_path=str(tmp_path / "last.ckpt"))._parse_ckpt_path()
    assert read == []  # never opened as an archive
    (tmp_path / "last.ckpt" / "latest").unlink()
    with pytest.raises(ValueError, match=r"last\.ckpt' is a directory but not a DeepSpeed checkpoint \(no 'latest'"):
        bare_cli("test", ckpt_path=str(tmp_path / "last.ckpt"))._parse_ckpt_path()
    assert read == []


unpickled: list[str] = []


def _record(name):
    unpickled.append(name)
    return name


class _Unsafe:
    """An object in a checkpoint's hyperparameters whose unpickling runs code (records its name)."""

    def __reduce__(self):
        return _record, ("ran",)


def test_hyperparameters_the_safe_loader_refuses_are_not_compared_nor_unpickled(tmp_path):
    """Settings are compared through the weights-only loader: an unsafe object is never unpickled."""
    path = tmp_path / "odd.ckpt"
    torch.save({"hyper_parameters": {"learning_rate": 1.0, "thing": _Unsafe()}}, path)
    cli = bare_cli("fit", ckpt_path=str(path), model={"init_args": {"learning_rate": 0.5}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli._parse_ckpt_path()
    assert unpickled == []


def save_hyperparameters(path, **saved):
    torch.save({"hyper_parameters": saved, "state_dict": {}}, path)
    return str(path)


def test_exactly_the_settings_that_differ_are_named(tmp_path):
    """Nested settings compare as plain data (a parsed Namespace and tuple equal the saved dict and list); linked
    and private entries, a setting only the checkpoint has and one the config leaves to the module are skipped. A
    resumed fit keeps the optimizer's settings from the checkpoint and says so; an evaluation uses them all."""
    path = save_hyperparameters(
        tmp_path / "last.ckpt", learning_rate=0.1, max_new_tokens=4, warmup_steps=5, _instantiator="a",
        processor="saved processor", eval_method="rcp", only_saved=1,
        compensation={"class_path": "x.Plugin", "init_args": {"layers": [1, 2]}})
    current = {"learning_rate": 0.2, "max_new_tokens": 8, "warmup_steps": 5, "_instantiator": "b", "processor": None,
               "categories": ["count"], "eval_method": None,
               "compensation": Namespace(class_path="x.Plugin", init_args=Namespace(layers=(1, 2)))}
    for subcommand, used, kept in (("fit", ["max_new_tokens"], ["learning_rate"]),
                                   ("test", ["learning_rate", "max_new_tokens"], [])):
        cli = bare_cli(subcommand, ckpt_path=path, model={"class_path": "m", "init_args": current})
        with pytest.warns(UserWarning) as caught:
            cli._parse_ckpt_path()
        messages = [str(w.message) for w in caught if "differently" in str(w.message)]
        assert messages[0] == (f"--ckpt_path {path}: the config sets model.init_args {used} differently from the "
                               "run that wrote the checkpoint; the config's values are used")
        assert messages[1:] == ([f"--ckpt_path {path}: the config sets model.init_args {kept} differently from the "
                                 "run that wrote the checkpoint, but a resumed fit restores the optimizer and its "
                                 "learning-rate schedule from the checkpoint, so the checkpoint's values stay in force; "
                                 "start a new run (without --ckpt_path, or with the plug-in's weights as "
                                 "plugin_weights_path) to train with these"] if kept else [])
    current.update(learning_rate=0.1, max_new_tokens=4, processor="another processor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli._parse_ckpt_path()


# --------------------------------------------------------------------------------------------- --ckpt_path auto


def auto_cli(subcommand: str, root, dirpath=None) -> LVLMPruneCLI:
    cli = bare_cli(subcommand, ckpt_path="auto", model=None)
    cli.config_init = {subcommand: {"ckpt_path": "auto"}}
    cli.subcommand = subcommand
    cli.trainer = SimpleNamespace(default_root_dir=str(root), loggers=[],
                                  checkpoint_callbacks=[SimpleNamespace(dirpath=dirpath)])
    return cli


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_an_evaluation_with_auto_and_no_checkpoint_stops(subcommand, tmp_path):
    """validate, test and predict with `auto` and no checkpoint stop, naming the subcommand."""
    cli = auto_cli(subcommand, tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"--ckpt_path auto: this run has no checkpoint to {subcommand} "):
        getattr(cli, f"before_{subcommand}")()


def test_a_fit_with_auto_and_no_checkpoint_starts_from_scratch(tmp_path):
    """fit with `auto` and no checkpoint warns and starts fresh (ckpt_path None)."""
    cli = auto_cli("fit", tmp_path)
    with pytest.warns(UserWarning, match="no checkpoint of this run yet, starting from scratch"):
        cli.before_fit()
    assert cli.config_init["fit"]["ckpt_path"] is None


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_auto_finds_a_deepspeed_checkpoint_directory_of_the_run(subcommand, tmp_path):
    """Every subcommand resolves `auto`; a DeepSpeed directory (under the DeepSpeed strategy) without the model-states
    file is left to the trainer."""
    (tmp_path / "ckpts" / "last.ckpt").mkdir(parents=True)
    (tmp_path / "ckpts" / "last.ckpt" / "latest").write_text("checkpoint")
    cli = auto_cli(subcommand, tmp_path, dirpath=str(tmp_path / "ckpts"))
    cli.trainer.strategy = object.__new__(DeepSpeedStrategy)
    getattr(cli, f"before_{subcommand}")()
    assert cli.config_init[subcommand]["ckpt_path"] == str(tmp_path / "ckpts" / "last.ckpt")


# ------------------------------------------------------------------------------------------------ config files


def test_config_files_are_checked_in_every_spelling_and_inline_yaml_is_left_to_jsonargparse(tmp_path):
    """--config F, --config=F, -c F and -c=F files are parsed; inline YAML is not read as a path."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [1\n")
    good = tmp_path / "good.yaml"
    good.write_text("trainer: {max_steps: 1}\n")
    for args in (["--config", str(broken)], [f"--config={broken}"], [f"-c={broken}"],
                 ["--config", str(good), "-c", str(broken)]):
        with pytest.raises(ValueError, match=rf"--config {broken}: not valid YAML"):
            check_config_files(["fit", *args])
    check_config_files(["fit", "--config", str(good), "--config", "{trainer: {max_steps: 2}}", "--config=[1"])


# ------------------------------------------------------------------------------------------- constructor errors


def test_a_constructor_error_comes_out_of_jsonargparse_s_wrappers_and_others_pass_unchanged(monkeypatch):
    """Nested wrappers are unwrapped to the constructor's error; an own ValueError keeps its cause."""
    def raising(error):
        def instantiate(self):
            raise error
        monkeypatch.setattr(LightningCLI, "instantiate_classes", instantiate)

    cause = FileNotFoundError("data.init_args.processor_path: no such directory")
    per_class = ValueError("Problem with given class_path 'datamodules.synthetic.SyntheticVQADataModule':\n ...")
    per_class.__cause__ = cause
    union = ValueError("Does not validate against any of the Union subtypes\nSubtypes: ...")
    union.__cause__ = per_class
    raising(union)
    with pytest.raises(FileNotFoundError) as caught:
        LVLMPruneCLI.__new__(LVLMPruneCLI).instantiate_classes()
    assert caught.value is cause
    own = ValueError("model.init_args.learning_rate=-1.0 must be > 0")
    own.__cause__ = KeyError("learning_rate")
    raising(own)
    with pytest.raises(ValueError) as caught:
        LVLMPruneCLI.__new__(LVLMPruneCLI).instantiate_classes()
    assert caught.value is own and isinstance(own.__cause__, KeyError)


# --------------------------------------------------------------------------------------------- the trainer built


class KeptCheckpointIO(TorchCheckpointIO):
    """A user's own checkpoint IO (a `TorchCheckpointIO` subclass)."""


def built(tmp_path, *extra):
    return cli_main(["--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                     *extra], run=False)


def test_the_trainer_gets_the_project_s_callbacks_and_atomic_checkpoint_files(tmp_path):
    """Links, forced callbacks and their defaults, the config record's name, atomic or user checkpoint IO."""
    cli = built(tmp_path, "--trainer.enable_progress_bar", "true")
    # the datamodule's processor and question families reach the model (a YAML names them once)
    assert cli.model.processor is cli.datamodule.processor
    assert cli.model.categories == cli.datamodule.categories == list(cli.datamodule.hparams.families)
    trainer = cli.trainer
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.index(ResumableDataOrder) < kinds.index(SlurmRequeue)  # its count includes the requeue batch
    (bar,) = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert bar.refresh_rate == 10
    (checkpoint,) = trainer.checkpoint_callbacks
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.save_top_k == 0
    # the run's config record: config.yaml when no subcommand names another one (run=False)
    (record,) = [c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)]
    assert record.config_filename == "config.yaml"
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    own = built(tmp_path, "--trainer.plugins", f"{__name__}.KeptCheckpointIO").trainer
    assert type(own.strategy.checkpoint_io) is KeptCheckpointIO


# ------------------------------------------------------------------------------------------ lvlm_prune.archives


def test_an_archive_with_a_damaged_central_directory_is_named(tmp_path):
    """An archive whose end record is whole but whose member index is broken is named, not raised."""
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.arange(8)}, path)
    data = bytearray(path.read_bytes())
    start = data.rindex(b"PK\x01\x02", 0, data.rindex(b"PK\x05\x06"))  # the last member's central record
    data[start:start + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    assert zipfile.is_zipfile(path)  # its end record is whole
    assert torch_archive_problem(path).startswith("an unreadable archive (")


def test_exported_weights_get_the_umask_s_permissions_and_the_umask_stays(tmp_path):
    """0666 less the umask (0640 under 027), and the process umask is restored."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"w")
    os.chmod(path, 0o600)
    previous = os.umask(0o027)
    try:
        assert with_default_permissions(path) == path
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_an_export_into_a_new_directory_keeps_its_subdirectories(tmp_path):
    """Missing parents are made; files in subdirectories of the staging move in too."""
    target = tmp_path / "runs" / "demo" / "base_model"  # neither it nor its parent exists yet
    with staged_export(target) as staging:
        (staging / "tokenizer" / "extra").mkdir(parents=True)
        (staging / "tokenizer" / "extra" / "vocab.txt").write_text("red")
        (staging / "config.json").write_text("{}")
    assert (target / "tokenizer" / "extra" / "vocab.txt").read_text() == "red"
    assert sorted(p.name for p in target.parent.iterdir()) == ["base_model"]


def test_the_weights_digest_covers_every_byte_of_every_weight_file_in_name_order(tmp_path):
    """sha256 of the safetensors files' bytes in name order, whatever their size; other files do not count."""
    first = os.urandom(3 << 19)  # 1.5 MiB: more than one read
    (tmp_path / "model-00002.safetensors").write_bytes(b"second")
    (tmp_path / "model-00001.safetensors").write_bytes(first)
    (tmp_path / "config.json").write_text("{}")
    digest = weights_digest(tmp_path)
    assert digest == hashlib.sha256(first + b"second").hexdigest()
    (tmp_path / "config.json").write_text('{"other": 1}')  # not the weights
    assert weights_digest(tmp_path) == digest


# -------------------------------------------------------------------------------------------- lvlm_prune.runner

IMAGE = 9


def test_non_visual_prompt_tokens_count_neither_padding_nor_image_tokens():
    """Per row: attended tokens that are not the image token."""
    ids = torch.tensor([[0, 0, 1, IMAGE, IMAGE, 5, 6], [1, IMAGE, IMAGE, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert prompt_text_tokens(ids, mask, IMAGE).tolist() == [3, 5]


def test_only_llava_next_configs_with_image_sizes_have_crops():
    """Plain LLaVA (or no image sizes): one image per sample, None."""
    sizes = torch.tensor([[20, 40]])
    assert vision_crops(SimpleNamespace(model_type="llava"), sizes) is None
    assert vision_crops(SimpleNamespace(), sizes) is None
    assert vision_crops(SimpleNamespace(model_type="llava_next"), None) is None


def test_anyres_crops_follow_each_image_s_height_and_width():
    """Pinpoints (height, width) 16x32 and 32x32 of 16-pixel crops: a wide image (20 high, 40 wide) fits 16x32
    best (the base crop + 1x2), a tall one (40 high, 20 wide) only 32x32 (base + 2x2)."""
    config = SimpleNamespace(model_type="llava_next", image_grid_pinpoints=[[16, 32], [32, 32]],
                             vision_config=SimpleNamespace(image_size=16))
    assert vision_crops(config, torch.tensor([[20, 40], [40, 20]])) == [3, 5]


class _Engine:
    """Stands in for `PrunedLlava`: records how it was asked to generate."""

    image_token_id = IMAGE
    config = SimpleNamespace(model_type="llava")

    def generate(self, input_ids, attention_mask, pixel_values, **kwargs):
        self.asked = (input_ids, attention_mask, pixel_values, kwargs)
        return torch.tensor([[4, 2], [5, 2]]), torch.tensor([[3.0, 1.0], [3.0, 2.0]])


class _Method:
    def plugin_flops(self, text_tokens):
        self.text_tokens = text_tokens
        return {"pruner": 100.0 * text_tokens}


def test_a_method_generates_with_the_batch_s_prompt_and_is_charged_per_sample():
    """The engine gets the batch's prompt and settings; plug-in FLOPs are priced at the mean prompt length."""
    ids = torch.tensor([[0, 0, 0, 0, 1, IMAGE, 5], [1, IMAGE, 5, 6, 7, 8, 10]])
    mask = (ids != 0).long()
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask, "pixel_values": torch.zeros(2, 3, 4, 4),
             "prompt_position_ids": torch.arange(7).expand(2, 7)}
    engine, method = _Engine(), _Method()
    result = generate_with_method(engine, batch, method, max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    input_ids, attention_mask, pixels, kwargs = engine.asked
    assert input_ids is ids and attention_mask is mask and pixels is batch["pixel_values"]
    assert kwargs == {"position_ids": batch["prompt_position_ids"], "method": method, "max_new_tokens": 2,
                      "eos_token_id": 2, "pad_token_id": 0, "image_sizes": None}
    assert result.tokens.tolist() == [[4, 2], [5, 2]]
    assert result.visual_tokens_per_layer.tolist() == [[3.0, 1.0], [3.0, 2.0]]
    assert result.text_tokens.tolist() == [2, 6]
    assert method.text_tokens == 4  # the batch's mean prompt length
    assert result.plugin_flops["pruner"].dtype == torch.float32
    assert result.plugin_flops["pruner"].tolist() == [400.0, 400.0] and result.vision_crops is None


def test_each_sample_is_charged_its_own_prompt_visual_tokens_plug_ins_and_crops(tiny_spec):
    """Each report is llava_prefill_report of that sample's own numbers, in the given convention."""
    config = make_tiny_llava(tiny_spec).config
    layers = tiny_spec.num_layers
    result = GenerationResult(torch.zeros(2, 3, dtype=torch.long),
                              torch.tensor([[16.0] * layers, [16.0, 8.0] + [4.0] * (layers - 2)]),
                              torch.tensor([6, 11]), {"pruner": torch.tensor([1000.0, 3000.0])}, [1, 3])
    reports = per_sample_flops(config, result, "exact")
    for b, (text, crops) in enumerate(((6.0, 1), (11.0, 3))):
        expected = llava_prefill_report(config, text, result.visual_tokens_per_layer[b].tolist(), convention="exact",
                                        plugins={"pruner": float(result.plugin_flops["pruner"][b])},
                                        run_all_vision_layers=True, num_images=crops)
        assert reports[b] == expected.to_metrics()
    assert reports[0]["llm_prefill"] != reports[1]["llm_prefill"]
    assert per_sample_flops(config, result)[0]["llm_prefill"] != reports[0]["llm_prefill"]  # fastv by default
