"""scripts/rcp_ablations.py reuses a variant's earlier run only when it was trained as that variant."""

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("rcp_ablations", ROOT / "scripts" / "rcp_ablations.py")
ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablations)


def saved_run(tmp_path, base, **settings):
    run = tmp_path / "rcp_ablation_2" / "run"
    run.mkdir(parents=True)
    plugin = {**ablations.expected_settings(0.889, []), **settings}  # the full method's settings, then changes
    config = {"model": {"init_args": {"base_model_path": str(base), "compensation": {"init_args": plugin}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_a_run_of_another_variant_ratio_or_base_is_not_reused(tmp_path):
    variant = ablations.VARIANTS["without adapter"]
    base = tmp_path / "base_model"
    ablations.check_reusable(saved_run(tmp_path, base, use_adapter=False), str(base), 0.889, variant)
    with pytest.raises(ValueError, match=r"rcp_ablation_2 was trained with other settings: use_adapter=True \(wanted "
                                         r"False\); remove it \(rm -r .*rcp_ablation_2\)"):
        ablations.check_reusable(saved_run(tmp_path / "a", base), str(base), 0.889, variant)
    # every setting counts, not only the variant's own switch: the full method's slot trained without the adapter,
    # or a variant trained with another pruning layer, is not reused
    with pytest.raises(ValueError, match=r"use_adapter=False \(wanted True\)"):
        ablations.check_reusable(saved_run(tmp_path / "d", base, use_adapter=False), str(base), 0.889, [])
    with pytest.raises(ValueError, match=r"pruning_layers=\[0, 5\] \(wanted \[0\]\)"):
        ablations.check_reusable(saved_run(tmp_path / "e", base, use_adapter=False, pruning_layers=[0, 5]),
                                 str(base), 0.889, variant)
    with pytest.raises(ValueError, match=r"target_prune_ratio=0.889 \(wanted 0.778\)"):
        ablations.check_reusable(saved_run(tmp_path / "b", base, use_adapter=False), str(base), 0.778, variant)
    with pytest.raises(ValueError, match=r"base_model_path=.*other_base.* \(wanted .*no plug-in export records"):
        ablations.check_reusable(saved_run(tmp_path / "c", tmp_path / "other_base", use_adapter=False), str(base),
                                 0.889, variant)


def test_a_variant_whose_run_directory_was_moved_is_reused_by_its_base_fingerprint(tmp_path, tiny_base_dir):
    import json
    import shutil

    from lightning_modules.compensation import fingerprints
    from lvlm_prune.modeling.loading import load_base_model

    variant = ablations.VARIANTS["without adapter"]
    moved = tmp_path / "copy" / "base_model"
    shutil.copytree(tiny_base_dir, moved)
    run = saved_run(tmp_path, "/elsewhere/base_model", use_adapter=False)  # the path it was trained at
    record = run.parent / "plugin.safetensors.json"
    record.write_text(json.dumps({"base_fingerprint": fingerprints(load_base_model(str(tiny_base_dir)))[0]}))
    ablations.check_reusable(run, str(moved), 0.889, variant)  # the same base: reused
    record.write_text(json.dumps({"base_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match=r"the base fingerprint recorded beside its plugin.safetensors \(another base"):
        ablations.check_reusable(run, str(moved), 0.889, variant)
    # a base retrained in place: the same path, another fingerprint
    in_place = saved_run(tmp_path / "in_place", moved, use_adapter=False)
    (in_place.parent / "plugin.safetensors.json").write_text(json.dumps({"base_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match=r"or the base was retrained since"):
        ablations.check_reusable(in_place, str(moved), 0.889, variant)
