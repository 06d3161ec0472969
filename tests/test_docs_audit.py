"""What docs/operations.md says a user does or sees: exporting a DeepSpeed base checkpoint, and the sweep's error
after a fit that ran no training batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.sweep import PruningSweep


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(torch.ones(4, 1), batch_size=2)

    def test_dataloader(self):
        return DataLoader(torch.ones(4, 1), batch_size=2)


def test_a_fit_without_training_batches_names_limit_train_batches_not_an_infinite_count(tmp_path):
    """With `trainer.limit_train_batches 0` Lightning skips the training loop before it loads the data, so
    `num_training_batches` is still inf: the sweep's error named "inf training batches per epoch"."""
    trainer = L.Trainer(max_steps=2, limit_train_batches=0, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[PruningSweep(methods=["full"])])
    with pytest.raises(ValueError, match=r"fit ran 0 training steps \(trainer\.global_step == 0, "
                                         r"trainer\.limit_train_batches=0\)") as error:
        trainer.fit(_Tiny(), datamodule=_Data())
    assert "inf" not in str(error.value)


def test_a_base_exported_from_a_deepspeed_checkpoint_loads_its_state_non_strictly(tmp_path):
    """docs/operations.md exports a finished DeepSpeed base run by loading the consolidated state into the module.
    The DeepSpeed presets keep frozen parameters out of the checkpoint (CLIP's post-layernorm, which the base does not
    train), so a strict load fails; the documented non-strict load misses exactly the frozen ones, and the error that
    sends the user there says so."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from datamodules.synthetic import SyntheticVQADataModule
    from lightning_modules.base_lvlm import BaseLVLMModule
    from lvlm_prune.modeling import TinyLlavaSpec

    data = SyntheticVQADataModule(grid=4, cell_size=8, min_objects=4, max_objects=5, num_train=8, num_val=8,
                                  num_test=8)
    spec = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                         hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    module = BaseLVLMModule(processor=data.processor, spec=spec, export_dir=str(tmp_path / "export"))
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    assert frozen  # what exclude_frozen_parameters leaves out of the checkpoint
    trained = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict(trained)
    missing = module.load_state_dict(trained, strict=False).missing_keys
    assert set(missing) == frozen

    module.trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), global_step=2,
                                     fit_loop=SimpleNamespace(done=True), ckpt_path="run/checkpoints/last.ckpt",
                                     is_global_zero=True)
    module._train_ended = False  # resumed at the end of training: no training loop ran
    with pytest.raises(ValueError, match=r"into the model with strict=False \(the checkpoint leaves out the frozen"):
        module.on_fit_end()
