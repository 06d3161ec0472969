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
    config = {"model": {"init_args": {"base_model_path": str(base),
                                      "compensation": {"init_args": {"target_prune_ratio": 0.889, **settings}}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_a_run_of_another_variant_ratio_or_base_is_not_reused(tmp_path):
    variant = ablations.VARIANTS["without adapter"]
    base = tmp_path / "base_model"
    ablations.check_reusable(saved_run(tmp_path, base, use_adapter=False), str(base), 0.889, variant)
    with pytest.raises(ValueError, match=r"rcp_ablation_2 was trained with other settings: use_adapter=None \(wanted "
                                         r"False\); remove it \(rm -r .*rcp_ablation_2\)"):
        ablations.check_reusable(saved_run(tmp_path / "a", base), str(base), 0.889, variant)
    with pytest.raises(ValueError, match=r"target_prune_ratio=0.889 \(wanted 0.778\)"):
        ablations.check_reusable(saved_run(tmp_path / "b", base, use_adapter=False), str(base), 0.778, variant)
    with pytest.raises(ValueError, match=r"base_model_path=.*other_base.* \(wanted"):
        ablations.check_reusable(saved_run(tmp_path / "c", tmp_path / "other_base", use_adapter=False), str(base),
                                 0.889, variant)
